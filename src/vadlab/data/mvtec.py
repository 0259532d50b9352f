"""Folder datasets in the MVTec AD layout (also used by BTAD, VisA-converted and our synthetic set).

Layout::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Every item is a dict with ``image`` float32 [3, S, S] in [0, 1], ``mask`` float32
[1, S, S] in {0, 1}, ``has_mask`` (False for a defective image without pixel labels, whose
``mask`` is all zero and must not be scored), ``label`` (0 normal, 1 defective), ``defect``,
``category`` and ``path``.

Image-level-only data (good/bad labels, no masks, e.g. ELPV): a defect folder with no
``ground_truth/<defect>/`` folder at all is read with image labels only; pixel metrics are then
reported as absent, never computed on invented masks. A ``ground_truth/<defect>/`` folder that
has masks for some images and not others is an error that names the images without one.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm.auto import tqdm

log = logging.getLogger("vadlab")
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time it comes up in this process (items are read every epoch)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL = "good"
SPLITS = ("train", "test")


# ----------------------------------------------------------------------------- files


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (case-insensitive extension), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def list_categories(root: str | os.PathLike) -> list[str]:
    """Names of the category folders under ``root`` (those holding ``train`` or ``test``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset root {root} does not exist or is not a folder; create the generated "
            f"dataset with `vadlab data synth --out {root}`, or point --data to an "
            "MVTec AD / BTAD folder"
        )
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and ((p / "train").is_dir() or (p / "test").is_dir())
    )


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    """The ground-truth file for image ``stem``: ``<stem>_mask.<ext>`` (MVTec) or ``<stem>.<ext>`` (BTAD)."""
    if not gt_dir.is_dir():
        return None
    wanted = {f"{stem}_mask", stem}
    found = [p for p in _image_files(gt_dir) if p.stem in wanted]
    found.sort(key=lambda p: (p.stem != f"{stem}_mask", p.name))
    return found[0] if found else None


# ----------------------------------------------------------------------------- decoding


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode ``path``; any decoding problem becomes an OSError naming the file."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise OSError(
            f"cannot read image file {path}: {exc}. The file is truncated or not an image; "
            "re-copy it from the original dataset (or regenerate the synthetic dataset) "
            "or delete it"
        ) from exc
    return img


def image_to_array(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any common mode to float32 RGB [H, W, 3] in [0, 1].

    8-bit modes go through PIL's RGB conversion (alpha dropped, palettes expanded).
    16-bit modes (``I;16*``) are divided by 65535; ``I`` (how some readers give 16-bit
    data) is divided by 65535 when it fits in [0, 65535], else min-max scaled; ``F``
    is kept when it lies in [0, 1], else min-max scaled. Values are never clipped away.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.ndim == 3:  # defensive: some plugins give [H, W, C]
            arr = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        if mode.startswith("I;16"):
            arr = arr / 65535.0
        else:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            if mode == "I" and lo >= 0 and hi <= 65535:
                arr = arr / 65535.0
            elif mode == "F" and lo >= 0 and hi <= 1:
                pass
            else:
                arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        arr = np.nan_to_num(arr, nan=0.0)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        return arr.astype(np.float32)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Read one image file of any mode as a [3, size, size] float tensor in [0, 1]."""
    return resize_image(image_to_array(_open_image(Path(path))), size)


def mask_to_array(img: Image.Image, path: str | os.PathLike | None = None) -> np.ndarray:
    """Binary [H, W] bool mask: defective where the largest colour channel is above half its maximum.

    A binary mask (values 0 and one other) is read exactly; any other mask (a JPEG-saved one, a
    background of 3) is binarised at half its maximum with a warning naming ``path``. Alpha is ignored.
    """
    if img.mode in ("RGBA", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode in ("LA", "La"):
        img = img.convert("L")
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)
    top = arr.max() if arr.size else 0
    if top <= 0:
        return np.zeros(arr.shape, dtype=bool)
    values = np.unique(arr)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        _warn_once(f"mask {path or '(image)'} is not binary (values {values.min()}..{values.max()}, "
                   f"{len(values)} levels): defect where it is above half its maximum ({top / 2:g})")
    return arr > top / 2


def resize_image(arr: np.ndarray, size: int) -> torch.Tensor:
    """[H, W, 3] float array -> [3, size, size] tensor, bilinear with antialiasing, clamped to [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t[0].clamp_(0.0, 1.0).contiguous()


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """[H, W] bool -> [1, size, size] float {0, 1} with nearest-neighbour resampling."""
    if mask.shape != (size, size):
        pil = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
        mask = np.asarray(pil) > 0
    return torch.from_numpy(mask.astype(np.float32))[None]


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Sample:
    """One file of the dataset: where the image (and its mask) lie and what it is."""

    path: Path
    mask_path: Path | None
    label: int
    defect: str


class MVTecDataset(Dataset):
    """One category of an MVTec-layout folder, as a torch Dataset of dicts.

    ``train`` holds ``train/good`` only; ``test`` holds every ``test/<defect>`` folder,
    where ``good`` is normal (all-zero mask) and every other folder is defective, with its
    masks in ``ground_truth/<defect>/`` (every image needs one) or, without that folder, with
    image labels only (see :attr:`pixel_labels_missing`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        category: str,
        split: str = "train",
        image_size: int = 256,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if int(image_size) < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.root = Path(root)
        self.category = str(category)
        self.split = split
        self.image_size = int(image_size)
        cats = list_categories(self.root)  # raises on a missing root
        self.category_dir = self.root / self.category
        if not self.category_dir.is_dir():
            listed = ", ".join(cats) if cats else "none"
            raise FileNotFoundError(
                f"category {self.category!r} not found: {self.category_dir} does not exist. "
                f"Categories under {self.root}: {listed}"
            )
        self.samples: list[Sample] = self._scan_train() if split == "train" else self._scan_test()

    # -- scanning

    def _scan_train(self) -> list[Sample]:
        good = self.category_dir / "train" / NORMAL
        if not good.is_dir():
            raise FileNotFoundError(
                f"training folder {good} is missing; an MVTec-layout category needs its "
                "defect-free training images in train/good/"
            )
        files = _image_files(good)
        if not files:
            raise FileNotFoundError(
                f"training folder {good} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                "put the defect-free training images there"
            )
        return [Sample(p, None, 0, NORMAL) for p in files]

    def _scan_test(self) -> list[Sample]:
        test_dir = self.category_dir / "test"
        if not test_dir.is_dir():
            raise FileNotFoundError(
                f"test folder {test_dir} is missing; an MVTec-layout category needs test/good/ "
                "and test/<defect>/ folders"
            )
        samples: list[Sample] = []
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            defect = defect_dir.name
            files = _image_files(defect_dir)
            if defect == NORMAL:
                samples += [Sample(path, None, 0, NORMAL) for path in files]
                continue
            gt_dir = self.category_dir / "ground_truth" / defect
            if not gt_dir.is_dir():  # image-level labels only: no pixel masks for this defect type
                samples += [Sample(path, None, 1, defect) for path in files]
                continue
            masks = {path: _find_mask(gt_dir, path.stem) for path in files}
            missing = [path for path, mask in masks.items() if mask is None]
            if missing:
                names = ", ".join(str(p) for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
                raise FileNotFoundError(
                    f"{len(missing)} of {len(files)} defective test images in {defect_dir} have no "
                    f"ground-truth mask in {gt_dir} (expected <stem>_mask.png): {names}. Add their masks, "
                    "move defect-free ones to test/good, or delete the folder "
                    f"{gt_dir} to evaluate this defect type with image labels only"
                )
            samples += [Sample(path, masks[path], 1, defect) for path in files]
        if not samples:
            raise FileNotFoundError(f"test folder {test_dir} holds no images")
        return samples

    # -- access

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """Image labels in item order (0 normal, 1 defective), without reading any image."""
        return [s.label for s in self.samples]

    @property
    def pixel_labels_missing(self) -> list[str]:
        """Defect folders read with image labels only (no ``ground_truth/<defect>/``); empty when all have masks."""
        return sorted({s.defect for s in self.samples if s.label == 1 and s.mask_path is None})

    @property
    def defects(self) -> list[str]:
        """Defect folder names in item order."""
        return [s.defect for s in self.samples]

    def _load_mask(self, s: Sample, image_hw: tuple[int, int]) -> np.ndarray:
        if s.mask_path is None:
            return np.zeros(image_hw, dtype=bool)
        m = _open_image(s.mask_path)
        if (m.height, m.width) != image_hw:
            raise ValueError(
                f"mask {s.mask_path} is {m.width}x{m.height} but its image {s.path} is "
                f"{image_hw[1]}x{image_hw[0]}; masks must have their image's size. "
                "Re-export the mask at the image's resolution"
            )
        mask = mask_to_array(m, s.mask_path)
        if s.label == 1 and not mask.any():
            _warn_once(f"mask {s.mask_path} of defective test image {s.path} is all zero: the image counts as "
                       "defective but adds no defect pixels; fix the mask or move the image to test/good")
        return mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        img = _open_image(s.path)
        hw = (img.height, img.width)
        mask = self._load_mask(s, hw)
        return {
            "image": resize_image(image_to_array(img), self.image_size),
            "mask": resize_mask(mask, self.image_size),
            "has_mask": s.label == 0 or s.mask_path is not None,
            "label": s.label,
            "defect": s.defect,
            "category": self.category,
            "path": str(s.path),
        }

    def check(self, progress: bool = True) -> int:
        """Decode every image and mask, check mask sizes; raise on the first bad file (named).

        Returns the number of items checked. Use it once after copying a dataset.
        """
        for s in tqdm(self.samples, desc=f"check {self.category}/{self.split}", disable=not progress, leave=False):
            img = _open_image(s.path)
            self._load_mask(s, (img.height, img.width))
        return len(self.samples)

    def __repr__(self) -> str:
        n_def = sum(self.labels)
        return (
            f"MVTecDataset(root={str(self.root)!r}, category={self.category!r}, split={self.split!r}, "
            f"image_size={self.image_size}, n={len(self)}, defective={n_def})"
        )

    @classmethod
    def unified(
        cls,
        root: str | os.PathLike,
        categories: Sequence[str] | None = None,
        split: str = "train",
        image_size: int = 256,
    ) -> "UnifiedDataset":
        """Several categories' splits concatenated (the multi-class / unified protocol).

        ``categories=None`` takes every category under ``root``. Items carry ``category``.
        """
        cats = list(categories) if categories is not None else list_categories(root)
        if not cats:
            raise FileNotFoundError(f"no categories found under {root}")
        return UnifiedDataset([cls(root, c, split, image_size) for c in cats])


class UnifiedDataset(ConcatDataset):
    """Concatenation of per-category :class:`MVTecDataset` s; items keep their ``category``."""

    def __init__(self, datasets: Iterable[MVTecDataset]) -> None:
        super().__init__(list(datasets))
        self.categories: list[str] = [d.category for d in self.datasets]  # type: ignore[attr-defined]

    @property
    def labels(self) -> list[int]:
        return [l for d in self.datasets for l in d.labels]  # type: ignore[attr-defined]

    @property
    def item_categories(self) -> list[str]:
        """Category of every item in order."""
        return [d.category for d in self.datasets for _ in range(len(d))]  # type: ignore[attr-defined]

    def check(self, progress: bool = True) -> int:
        return sum(d.check(progress) for d in self.datasets)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- loader


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each worker from torch's per-worker seed (reproducible augmentation)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int = 16,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffling and worker seeds come from ``seed`` (same seed, same order)."""
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=gen,
        worker_init_fn=_seed_worker,
        drop_last=drop_last,
    )
