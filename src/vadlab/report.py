"""Helpers for the book's chapters: read what the pipeline (`dvc repro`) wrote under results/."""

from __future__ import annotations

import os
from pathlib import Path

#: where the chapters find the pipeline's outputs (they run with book/ as working directory)
RESULTS = Path("..") / "results"


def pipeline_file(relative: str, results: Path = RESULTS) -> Path | None:
    """Path of a pipeline output, or a clear error if `dvc repro` has not produced it.

    With ``VADLAB_BOOK_ALLOW_MISSING_RESULTS=1`` (a fresh clone's book build) a missing file shows a
    note in the page instead and returns None.
    """
    path = Path(results) / relative
    if path.is_file():
        return path
    if os.environ.get("VADLAB_BOOK_ALLOW_MISSING_RESULTS") == "1":
        from IPython.display import Markdown, display

        display(Markdown(f"```{{note}}\n`results/{relative}` is missing: run `dvc repro` to produce it.\n```"))
        return None
    raise FileNotFoundError(f"{path} is missing: run `dvc repro` (or `make repro`) before building the book")
