"""ELPV: real electroluminescence images of solar cells, written in MVTec layout (image labels only).

The ``elpv-dataset`` package (PyPI, 1.0.0.post1) ships 2,624 8-bit grayscale 300x300 cell images
from 44 modules, each with a defect probability in {0, 1/3, 2/3, 1} given by experts and the module
type (``mono`` or ``poly``). There are no pixel masks. Dataset licence: CC BY-NC-SA 4.0. Cite
Buerhop-Lutz et al., "A Benchmark for Visual Identification of Defective Solar Cells in
Electroluminescence Imagery", EU PVSEC 2018, and Deitsch et al., "Automatic classification of
defective photovoltaic module cells in electroluminescence images", Solar Energy 185, 2019.

:func:`write_elpv` writes, per module type (category)::

    <out>/<type>/train/good/cellNNNN.png     80 % of the p = 0 cells (seeded split)
    <out>/<type>/test/good/cellNNNN.png      the other 20 % of the p = 0 cells
    <out>/<type>/test/defective/cellNNNN.png every p = 1 cell (no ground_truth/: image labels only)
    <out>/<type>/graded/cellNNNN.png         the p = 1/3 and 2/3 cells, outside the main protocol
    <out>/<type>/graded/probabilities.csv    file,probability of the graded cells

The split: the p = 0 cells of a type, sorted by file name, are permuted with
``numpy.random.default_rng(seed)``; the first ``round(train_fraction * n)`` go to training. The
optional ``max_train`` keeps only the first ``max_train`` of those (a cost cap, same seed); the rest
are not written. Images are copied byte for byte, so the same seed gives identical files.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ELPV_CATEGORIES = ("mono", "poly")
ELPV_VERSION = "1.0.0.post1"
INSTALL_HINT = f"pip install elpv-dataset=={ELPV_VERSION}"
CITATION = (
    "ELPV dataset (CC BY-NC-SA 4.0): Buerhop-Lutz et al., \"A Benchmark for Visual Identification of "
    "Defective Solar Cells in Electroluminescence Imagery\", EU PVSEC 2018; Deitsch et al., \"Automatic "
    "classification of defective photovoltaic module cells in electroluminescence images\", Solar Energy 185, 2019."
)


@dataclass(frozen=True)
class Cell:
    """One labelled cell of the package: its image file, defect probability and module type."""

    path: Path
    probability: float
    type: str


def elpv_cells() -> list[Cell]:
    """Every cell of the installed ``elpv-dataset`` package, read from its ``labels.csv``."""
    try:
        import elpv_dataset
    except ImportError as err:
        raise ImportError(
            f"the ELPV dataset needs the package elpv-dataset: {INSTALL_HINT} (a 90 MB wheel from PyPI)"
        ) from err
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"{labels} is missing: the elpv-dataset install is broken; reinstall with {INSTALL_HINT}")
    cells = []
    for line in labels.read_text().splitlines():
        if line.strip():
            name, prob, kind = line.split()
            cells.append(Cell(labels.parent / name, float(prob), kind))
    return cells


def elpv_split(cells: list[Cell], category: str, seed: int = 0, train_fraction: float = 0.8,
               max_train: int | None = None) -> dict[str, list[Cell]]:
    """The cells of one module type by destination: ``train``, ``test_good``, ``test_defective``, ``graded``."""
    if category not in ELPV_CATEGORIES:
        raise ValueError(f"ELPV category must be one of {ELPV_CATEGORIES}, got {category!r}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    mine = sorted((c for c in cells if c.type == category), key=lambda c: c.path.name)
    normal = [c for c in mine if c.probability == 0.0]
    order = np.random.default_rng(int(seed)).permutation(len(normal))
    n_train = int(round(train_fraction * len(normal)))
    train = sorted((normal[i] for i in order[:n_train]), key=lambda c: c.path.name)
    if max_train is not None:
        if int(max_train) < 1:
            raise ValueError(f"max_train must be a positive number of images or None, got {max_train!r}")
        train = sorted((normal[i] for i in order[: min(n_train, int(max_train))]), key=lambda c: c.path.name)
    return {
        "train": train,
        "test_good": sorted((normal[i] for i in order[n_train:]), key=lambda c: c.path.name),
        "test_defective": [c for c in mine if c.probability == 1.0],
        "graded": [c for c in mine if 0.0 < c.probability < 1.0],
    }


def write_elpv(out: str | os.PathLike, seed: int = 0, train_fraction: float = 0.8, max_train: int | None = None,
               categories: tuple[str, ...] = ELPV_CATEGORIES, limit: int | None = None,
               overwrite: bool = False) -> Path:
    """Write ELPV in MVTec layout under ``out`` (see the module docstring); returns ``out``.

    ``limit`` keeps only the first ``limit`` files of each destination folder (for quick tests). The
    folder is written under a temporary name and renamed at the end, so a crash leaves no half dataset.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
    cells = elpv_cells()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    folders = {"train": "train/good", "test_good": "test/good", "test_defective": "test/defective",
               "graded": "graded"}
    for category in categories:
        parts = elpv_split(cells, category, seed, train_fraction, max_train)
        for key, folder in folders.items():
            dest = tmp / category / folder
            dest.mkdir(parents=True, exist_ok=True)
            for cell in parts[key][:limit]:
                shutil.copyfile(cell.path, dest / cell.path.name)
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerow(["file", "probability"])
        writer.writerows([c.path.name, f"{c.probability:.6f}"] for c in parts["graded"][:limit])
        (tmp / category / "graded" / "probabilities.csv").write_text(rows.getvalue())
    (tmp / "README.txt").write_text(
        f"ELPV (elpv-dataset {ELPV_VERSION}) in MVTec layout, written by vadlab.data.elpv.write_elpv(seed={seed}, "
        f"train_fraction={train_fraction}, max_train={max_train}).\n"
        "test/defective has image labels only (p = 1, no masks); graded/ holds the p = 1/3 and 2/3 cells.\n"
        f"{CITATION}\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def read_graded(root: str | os.PathLike, category: str) -> list[tuple[Path, float]]:
    """(image path, defect probability) of the graded cells of ``category`` written by :func:`write_elpv`."""
    folder = Path(root) / category / "graded"
    table = folder / "probabilities.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{table} is missing: write the dataset with `vadlab data elpv --out {root}`")
    with open(table, newline="") as fh:
        return [(folder / row["file"], float(row["probability"])) for row in csv.DictReader(fh)]


class ElpvGraded:
    """The graded cells (p = 1/3, 2/3) of one category as a torch-style dataset of vadlab items.

    Items look like :class:`~vadlab.data.MVTecDataset` test items (``label`` 1, ``defect`` "graded",
    ``has_mask`` False) plus ``probability``; they are scored, never used for training or thresholds.
    """

    def __init__(self, root: str | os.PathLike, category: str, image_size: int = 256) -> None:
        self.cells = read_graded(root, category)
        self.category, self.image_size = str(category), int(image_size)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, index: int) -> dict:
        import torch

        from vadlab.data.mvtec import load_image

        path, probability = self.cells[index]
        return {"image": load_image(path, self.image_size),
                "mask": torch.zeros(1, self.image_size, self.image_size), "has_mask": False, "label": 1,
                "defect": "graded", "category": self.category, "path": str(path), "probability": probability}
