"""One-class digit tasks: one digit is "normal", every other digit is an anomaly.

``DigitsOneClass`` uses scikit-learn's bundled 8x8 digits (1797 images), so it works
offline; ``MNISTOneClass`` reads the MNIST idx files from a local folder.
Items have the same keys as :class:`vadlab.data.MVTecDataset` (the mask is all zero:
these tasks have image labels only).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


def _check_args(normal_digit: int, split: str, image_size: int) -> None:
    if int(normal_digit) not in range(10):
        raise ValueError(f"normal_digit must be 0..9, got {normal_digit!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")


def _to_rgb(gray: np.ndarray, size: int) -> torch.Tensor:
    """[N, h, w] gray in [0, 1] -> [N, 3, size, size] (bilinear, antialiased when shrinking)."""
    t = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[:, None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()


class _OneClassBase(Dataset):
    """Shared item logic: image, zero mask, label (digit != normal), defect = the digit."""

    category: str
    image_size: int
    _targets: np.ndarray
    _ids: list[str]

    def __len__(self) -> int:
        return len(self._targets)

    @property
    def labels(self) -> list[int]:
        return [int(t != self.normal_digit) for t in self._targets]

    def _image(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:
        digit = int(self._targets[i])
        return {
            "image": self._image(i),
            "mask": torch.zeros(1, self.image_size, self.image_size),
            "label": int(digit != self.normal_digit),
            "defect": str(digit),
            "category": self.category,
            "path": self._ids[i],
        }


class DigitsOneClass(_OneClassBase):
    """scikit-learn's 8x8 digits as a one-class task.

    All 1797 digits are split once, stratified by digit and seeded, into train and
    test (``test_fraction`` of each digit to test). ``train`` keeps only
    ``normal_digit``; ``test`` keeps every digit, label 1 for the others.
    """

    def __init__(
        self,
        normal_digit: int,
        split: str = "train",
        image_size: int = 32,
        seed: int = 0,
        test_fraction: float = 0.3,
    ) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        _check_args(normal_digit, split, image_size)
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
        self.normal_digit = int(normal_digit)
        self.split = split
        self.image_size = int(image_size)
        self.category = f"digit{self.normal_digit}"
        data = load_digits()
        idx = np.arange(len(data.target))
        train_idx, test_idx = train_test_split(
            idx, test_size=test_fraction, stratify=data.target, random_state=int(seed)
        )
        chosen = np.sort(train_idx if split == "train" else test_idx)
        if split == "train":
            chosen = chosen[data.target[chosen] == self.normal_digit]
        self.indices = chosen
        self._targets = data.target[chosen].astype(np.int64)
        self._ids = [f"digits/{i}" for i in chosen]
        self._images = _to_rgb(data.images[chosen] / 16.0, self.image_size)

    def _image(self, i: int) -> torch.Tensor:
        return self._images[i]


# ----------------------------------------------------------------------------- MNIST

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally .gz) of unsigned bytes into an array of its stated shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic number); re-download it")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    start = 4 + 4 * ndim
    n = int(np.prod(dims)) if dims else 0
    if len(raw) - start != n:
        raise ValueError(f"{path} is truncated or corrupt: header says {dims} but holds {len(raw) - start} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _find_idx(root: Path, name: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


class MNISTOneClass(_OneClassBase):
    """MNIST one-class task from local idx files (``train-images-idx3-ubyte[.gz]`` ...).

    ``train`` uses MNIST's training files and keeps ``normal_digit``; ``test`` uses the
    t10k files with every digit. Looks in ``root``, ``root/MNIST/raw`` and ``root/raw``.
    """

    def __init__(self, root: str | os.PathLike, normal_digit: int, split: str = "train", image_size: int = 32) -> None:
        _check_args(normal_digit, split, image_size)
        self.root = Path(root)
        self.normal_digit = int(normal_digit)
        self.split = split
        self.image_size = int(image_size)
        self.category = f"mnist{self.normal_digit}"
        names = _MNIST_FILES[split]
        found = [_find_idx(self.root, n) for n in names]
        if any(f is None for f in found):
            missing = [n for n, f in zip(names, found) if f is None]
            raise FileNotFoundError(
                f"MNIST files {', '.join(missing)} (or .gz) not found in {self.root} "
                f"(also looked in {self.root / 'MNIST' / 'raw'}). Put the MNIST idx files there; "
                "without them use DigitsOneClass, the offline default digit task"
            )
        images, targets = read_idx(found[0]), read_idx(found[1])
        if images.ndim != 3 or targets.ndim != 1 or len(images) != len(targets):
            raise ValueError(f"{found[0]} and {found[1]} do not match: shapes {images.shape} and {targets.shape}")
        keep = np.arange(len(targets))
        if split == "train":
            keep = keep[targets == self.normal_digit]
        self.indices = keep
        self._raw = images
        self._targets = targets[keep].astype(np.int64)
        self._ids = [f"mnist/{split}/{i}" for i in keep]

    def _image(self, i: int) -> torch.Tensor:
        return _to_rgb(self._raw[self.indices[i]][None] / 255.0, self.image_size)[0]
