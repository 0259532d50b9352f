"""Helpers for the book's chapters: read what the pipeline (`dvc repro`) wrote under results/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

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


def run_folder(dataset: str, run: str, category: str, seed: int, unified: bool = False) -> Path:
    """Output folder of one run and category relative to results/, as the pipeline writes it: a
    per-category run keeps one folder per seed, a unified run (one model for every category) none."""
    if unified:
        return Path(dataset, "unified", run, category)
    return Path(dataset, run, category, f"seed{seed}")


#: the book's classification of its methods (overview chapter): family -> methods of that family
FAMILIES: dict[str, tuple[str, ...]] = {
    "density on pretrained features": ("padim", "semi_orthogonal"),
    "memory bank": ("patchcore",),
    "normalizing flow": ("cflow", "pyramidflow"),
    "reconstruction": ("ae_ssim", "riad", "favae"),
    "distillation": ("mkd",),
    "deformation": ("dmad",),
    "diffusion": ("diad",),
}


def family_of(method: str) -> str:
    """The family of an implementation (``padim``, ``dmad``, ...), a KeyError naming the known ones otherwise."""
    for family, members in FAMILIES.items():
        if method in members:
            return family
    raise KeyError(f"{method!r} is in no family of vadlab.report.FAMILIES "
                   f"({', '.join(m for ms in FAMILIES.values() for m in ms)})")


def pareto_front(accuracy: pd.Series, cost: pd.Series) -> list[str]:
    """Runs that no other run beats on both counts (higher ``accuracy`` and lower ``cost``), cheapest first.

    A run is dominated when another is at least as accurate and at most as costly, and strictly better on
    one of the two. Runs with a missing value are left out.
    """
    both = accuracy.to_frame("acc").join(cost.to_frame("cost")).dropna()
    front = [r for r, (a, c) in both.iterrows()
             if not ((both.acc >= a) & (both.cost <= c) & ((both.acc > a) | (both.cost < c))).any()]
    return sorted(front, key=lambda r: both.loc[r, "cost"])


def synthesis(summary: pd.DataFrame, implementation: dict[str, str], elpv: pd.DataFrame | None = None,
              unified: pd.DataFrame | None = None) -> list[str]:
    """Sentences of the Results chapter's synthesis, computed from the pipeline's tables.

    ``summary``: the ``tables`` stage's ``summary.csv`` indexed by run (``image_auroc``, ``aupro``,
    ``fit_seconds``, ``predict_seconds_per_image``); ``implementation``: run -> method (``dmad_plus`` ->
    ``dmad``); ``elpv``: ``elpv_report``'s ``summary.csv`` indexed by run (``image_auroc``), or None;
    ``unified``: ``unified_vs_per_category.csv`` indexed by method with a ``protocol`` column, or None.
    Every number in the sentences is read from these tables, so they stay true after ``dvc repro``.
    """
    import pandas as pd

    runs = list(summary.index)
    fam = pd.Series({r: family_of(implementation[r]) for r in runs})

    def by_family(auroc: pd.Series) -> pd.DataFrame:
        """Best run of each family and its value, families ordered from best to worst."""
        rows = [{"family": f, "run": auroc[m.index].idxmax(), "auroc": auroc[m.index].max()}
                for f, m in fam.groupby(fam) if auroc[m.index].notna().any()]
        return pd.DataFrame(rows).sort_values("auroc", ascending=False).set_index("family")

    def listing(table: pd.DataFrame) -> str:
        return "; ".join(f"{f} {r.auroc:.3f} (`{r.run}`)" for f, r in table.iterrows())

    gen = by_family(summary["image_auroc"])
    best = summary["image_auroc"].idxmax()
    close = summary.index[summary["image_auroc"] >= summary["image_auroc"].max() - 0.02]
    out = [f"**Generated data, by family** (best run of each family, mean image AUROC over categories and "
           f"seeds): {listing(gen)}. The best run, `{best}` ({summary.loc[best, 'image_auroc']:.3f}), is within "
           f"0.02 of {len(close) - 1} other run(s)"
           + (f" ({', '.join(f'`{r}`' for r in close if r != best)})" if len(close) > 1 else "") + "."]
    if "aupro" in summary and summary["aupro"].notna().any():
        loc = summary["aupro"].idxmax()
        out.append(f"**Localisation.** Best AUPRO on the generated data: `{loc}` ({summary.loc[loc, 'aupro']:.3f}); "
                   f"the best image-level run `{best}` reaches {summary.loc[best, 'aupro']:.3f}.")
    if elpv is not None and len(elpv):
        real = by_family(elpv["image_auroc"].reindex(runs))
        same = real.index[0] == gen.index[0]
        out.append(f"**Real images (ELPV), by family**: {listing(real)}. "
                   + (f"The same family leads on both datasets ({real.index[0]})."
                      if same else f"The leading family changes: {gen.index[0]} on the generated data, "
                                   f"{real.index[0]} on ELPV."))
    ms = 1000 * summary["predict_seconds_per_image"]
    front = pareto_front(summary["image_auroc"], ms)
    fit_front = pareto_front(summary["image_auroc"], summary["fit_seconds"])
    out.append("**Accuracy against cost.** Runs that no other run beats on both image AUROC and inference time: "
               + ", ".join(f"`{r}` ({summary.loc[r, 'image_auroc']:.3f} at {ms[r]:.1f} ms per image)" for r in front)
               + "; on image AUROC and fit time: "
               + ", ".join(f"`{r}` ({summary.loc[r, 'fit_seconds']:.0f} s)" for r in fit_front)
               + ". Every other run costs more for less on this data.")
    if unified is not None and len(unified):
        parts = []
        for m, rows in unified.groupby(level=0, sort=False):
            u = rows[rows["protocol"] == "unified"]["image_auroc"]
            p = rows[rows["protocol"] == "per-category"]["image_auroc"]
            parts.append(f"`{m}` {float(u.iloc[0]):.3f}" + (f" (per category {float(p.iloc[0]):.3f})" if len(p) else ""))
        out.append("**One model for all categories** (unified protocol, mean image AUROC): " + "; ".join(parts) + ".")
    return out
