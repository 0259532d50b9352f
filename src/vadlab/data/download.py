"""Fetch MVTec AD, BTAD and VisA, check their archives, and lay them out like MVTec AD.

Every real dataset ends up in the one layout :class:`vadlab.data.MVTecDataset` reads::

    <out>/<category>/train/good/*            defect-free training images
    <out>/<category>/test/good/*             defect-free test images
    <out>/<category>/test/<defect>/*         defective test images
    <out>/<category>/ground_truth/<defect>/<stem>_mask.png

Steps: find the archive (an explicit local file, the download cache, or the URL), check its
SHA-256 against the published value, unpack it into a scratch folder next to ``out``, convert it
(MVTec AD: as is; BTAD: ``ok``/``ko`` folders renamed; VisA: the official ``split_csv/1cls.csv``
one-class split), check every category loads, and only then move the result to ``out``.

The archive checksums are the SHA-256 values anomalib 2.7.0 verifies its downloads against (the
datasets' hosts publish none); a different value can be passed (``sha256=...``, CLI ``--sha256``,
params ``downloads.<name>.sha256``), and an empty one skips the check with a warning.
Without a network the error names the URL and the exact path where a copy of the archive,
fetched elsewhere, is picked up.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

MVTEC_CATEGORIES: tuple[str, ...] = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                                     "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                                     "zipper")
BTAD_CATEGORIES: tuple[str, ...] = ("01", "02", "03")
VISA_CATEGORIES: tuple[str, ...] = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
                                    "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class DownloadError(OSError):
    """The archive could be neither found locally nor fetched (e.g. no network)."""


class ChecksumError(ValueError):
    """The archive's SHA-256 differs from the expected one (truncated or different file)."""


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset's archive lives, what it should hash to, and how it becomes MVTec layout."""

    name: str
    url: str
    sha256: str
    archive: str  # file name of the archive in the download cache
    categories: tuple[str, ...]
    homepage: str
    license: str


SOURCES: dict[str, DatasetSource] = {
    "mvtec": DatasetSource(
        "mvtec",
        "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/420938113-1629960298/"
        "mvtec_anomaly_detection.tar.xz",
        "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        "mvtec_anomaly_detection.tar.xz", MVTEC_CATEGORIES,
        "https://www.mvtec.com/company/research/datasets/mvtec-ad", "CC BY-NC-SA 4.0"),
    "btad": DatasetSource(
        "btad", "https://avires.dimi.uniud.it/papers/btad/btad.zip",
        "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
        "btad.zip", BTAD_CATEGORIES, "https://avires.dimi.uniud.it/papers/btad/", "see the dataset page"),
    "visa": DatasetSource(
        "visa", "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        "VisA_20220922.tar", VISA_CATEGORIES, "https://github.com/amazon-science/spot-diff", "CC BY 4.0"),
}


def default_cache() -> Path:
    """Folder that keeps downloaded archives: ``$VADLAB_DOWNLOADS`` or ``~/.cache/vadlab/downloads``."""
    return Path(os.environ.get("VADLAB_DOWNLOADS", Path.home() / ".cache" / "vadlab" / "downloads")).expanduser()


def source(name: str) -> DatasetSource:
    """The :class:`DatasetSource` of ``name`` (mvtec, btad or visa)."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


# ----------------------------------------------------------------------------- archive


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (the archives are several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, sha256: str | None) -> None:
    """Raise :class:`ChecksumError` unless ``path`` hashes to ``sha256``; an empty value skips the check."""
    if not sha256:
        warnings.warn(f"no SHA-256 given for {path}: its content is not verified", stacklevel=2)
        return
    got = sha256sum(path)
    if got != sha256.lower():
        raise ChecksumError(f"{path} has SHA-256 {got}, expected {sha256.lower()}: the file is truncated or not "
                            "the published archive. Delete it and download again, or pass the checksum of the "
                            "archive you trust (--sha256 / params downloads.<name>.sha256)")


def fetch(url: str, dest: Path, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` (via a ``.part`` file, so an interrupted download never looks complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as fh:
            shutil.copyfileobj(response, fh, length=1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as err:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download {url} ({type(err).__name__}: {getattr(err, 'reason', err)}). Without a network: "
            f"fetch that file on a machine that has one and copy it to {dest} (it is picked up from there and its "
            "checksum verified), or pass it with --archive PATH") from err
    part.replace(dest)
    return dest


def obtain_archive(src: DatasetSource, archive: str | os.PathLike | None = None, url: str | None = None,
                   cache: str | os.PathLike | None = None) -> Path:
    """A local copy of the dataset's archive: ``archive`` if given, else the cached one, else downloaded."""
    if archive is not None:
        path = Path(archive).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"archive {path} does not exist; pass the downloaded {src.archive}")
        return path
    cached = Path(cache).expanduser() if cache is not None else default_cache()
    cached = cached / src.archive
    if cached.is_file():
        return cached
    return fetch(url or src.url, cached)


def _within(root: Path, member: str) -> bool:
    target = (root / member).resolve()
    return target == root.resolve() or root.resolve() in target.parents


def extract(archive: Path, dest: Path) -> Path:
    """Unpack a .tar(.xz/.gz) or .zip archive into ``dest``; refuses members that point outside it."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            bad = [n for n in zf.namelist() if not _within(dest, n)]
            if bad:
                raise ValueError(f"{archive} holds paths outside the target folder, e.g. {bad[0]!r}; not extracting")
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            bad = [m.name for m in tf.getmembers() if not _within(dest, m.name)]
            if bad:
                raise ValueError(f"{archive} holds paths outside the target folder, e.g. {bad[0]!r}; not extracting")
            refused = [m.name for m in tf.getmembers() if not (m.isfile() or m.isdir())]
            if refused:
                raise ValueError(f"{archive} holds links or device files, e.g. {refused[0]!r}; a dataset archive "
                                 "holds only files and folders: not extracting (re-download it from the source)")
            try:
                tf.extractall(dest, filter="data")
            except tarfile.TarError as err:
                raise ValueError(f"{archive}: cannot extract safely ({err}); re-download it from the source") from None
    else:
        raise ValueError(f"{archive} is neither a tar nor a zip archive; check that the download is complete")
    return dest


def _find_dir(root: Path, wanted: Callable[[Path], bool]) -> Path:
    """The shallowest folder under ``root`` (itself included) for which ``wanted`` holds."""
    for depth in range(4):
        for candidate in sorted(root.glob("/".join(["*"] * depth)) if depth else [root]):
            if candidate.is_dir() and wanted(candidate):
                return candidate
    raise FileNotFoundError(f"no dataset folder found under {root}: the archive does not have the expected content")


# ----------------------------------------------------------------------------- conversions


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES) \
        if folder.is_dir() else []


def _write_mask(src: Path, dst: Path) -> None:
    """Copy a mask as a binary 0/255 PNG (VisA stores small class indices, BTAD grey levels)."""
    mask = np.asarray(Image.open(src))
    if mask.ndim == 3:
        mask = mask[..., :3].max(axis=-1)
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((mask > 0) * 255).astype(np.uint8)).save(dst)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def convert_mvtec(raw: Path, out: Path, categories: tuple[str, ...] = MVTEC_CATEGORIES) -> Path:
    """MVTec AD already has the layout: move each category folder from the unpacked archive to ``out``."""
    base = _find_dir(raw, lambda d: all((d / c / "train").is_dir() for c in categories[:1]))
    out.mkdir(parents=True, exist_ok=True)
    for c in categories:
        if not (base / c).is_dir():
            raise FileNotFoundError(f"category {c!r} is missing from the MVTec AD archive under {base}")
        shutil.move(str(base / c), str(out / c))
    return out


def convert_btad(raw: Path, out: Path, categories: tuple[str, ...] = BTAD_CATEGORIES) -> Path:
    """BTAD: ``train/ok``, ``test/ok`` and ``test/ko`` + ``ground_truth/ko/<stem>.png`` -> MVTec names."""
    base = _find_dir(raw, lambda d: (d / categories[0] / "train" / "ok").is_dir())
    for c in categories:
        src = base / c
        if not (src / "train" / "ok").is_dir():
            raise FileNotFoundError(f"BTAD category {c!r} has no {src / 'train' / 'ok'} folder")
        for split, label, target in (("train", "ok", "good"), ("test", "ok", "good"), ("test", "ko", "ko")):
            for img in _images(src / split / label):
                _copy(img, out / c / split / target / img.name)
                if label == "ko":
                    gt = _images(src / "ground_truth" / "ko")
                    masks = [m for m in gt if m.stem in (img.stem, f"{img.stem}_mask")]
                    if not masks:
                        raise FileNotFoundError(f"BTAD image {img} has no mask in {src / 'ground_truth' / 'ko'}")
                    _write_mask(masks[0], out / c / "ground_truth" / "ko" / f"{img.stem}_mask.png")
    return out


def convert_visa(raw: Path, out: Path, categories: tuple[str, ...] | None = None) -> Path:
    """VisA: copy images as the official one-class split ``split_csv/1cls.csv`` assigns them.

    Rows are ``object, split, label, image, mask`` with split train/test and label normal/anomaly;
    normal images go to ``<split>/good``, anomalous test images to ``test/bad`` with their mask
    (binarised) as ``ground_truth/bad/<stem>_mask.png``.
    """
    base = _find_dir(raw, lambda d: (d / "split_csv" / "1cls.csv").is_file())
    wanted = set(categories) if categories is not None else None
    counts: dict[str, int] = {}
    with open(base / "split_csv" / "1cls.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"object", "split", "label", "image"} <= set(rows[0]):
        raise ValueError(f"{base / 'split_csv' / '1cls.csv'} does not have the columns object, split, label, image, "
                         "mask of VisA's one-class split")
    for row in rows:
        obj, split, label = row["object"].strip(), row["split"].strip(), row["label"].strip()
        if wanted is not None and obj not in wanted:
            continue
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise ValueError(f"unexpected split/label {split!r}/{label!r} in VisA's 1cls.csv row {row}")
        if split == "train" and label != "normal":
            raise ValueError(f"VisA's 1cls.csv puts an anomalous image in train: {row}")
        image = base / row["image"].strip()
        if not _within(base, row["image"].strip()) or not image.is_file():
            raise FileNotFoundError(f"VisA image {image} listed in 1cls.csv is missing")
        folder = "good" if label == "normal" else "bad"
        _copy(image, out / obj / split / folder / image.name)
        if label == "anomaly":
            mask = base / (row.get("mask") or "").strip()
            if not (row.get("mask") or "").strip() or not mask.is_file():
                raise FileNotFoundError(f"VisA anomalous image {image} has no mask file ({mask})")
            _write_mask(mask, out / obj / "ground_truth" / "bad" / f"{image.stem}_mask.png")
        counts[obj] = counts.get(obj, 0) + 1
    missing = sorted((wanted or set()) - set(counts))
    if missing:
        raise FileNotFoundError(f"VisA's 1cls.csv lists no images of {missing}")
    return out


CONVERTERS: dict[str, Callable[..., Path]] = {"mvtec": convert_mvtec, "btad": convert_btad, "visa": convert_visa}


# ----------------------------------------------------------------------------- entry points


def check_dataset(root: str | os.PathLike, categories: list[str] | tuple[str, ...], name: str = "") -> None:
    """Raise a clear error unless every category of ``root`` loads (train and test) in MVTec layout."""
    from vadlab.data.mvtec import MVTecDataset

    root = Path(root)
    hint = (f"run `vadlab data download {name} --out {root}` (or the DVC stage download@{name})"
            if name in SOURCES else "put the dataset there in MVTec AD layout")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist: {hint}")
    for c in categories:
        for split in ("train", "test"):
            try:
                MVTecDataset(root, c, split)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{err}. {hint}") from err


def download(name: str, out: str | os.PathLike, *, url: str | None = None, sha256: str | None = None,
             archive: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
             categories: tuple[str, ...] | None = None) -> Path:
    """Fetch (or reuse) dataset ``name``'s archive, verify it, convert it to MVTec layout at ``out``.

    ``sha256=None`` uses the known checksum, ``""`` skips verification. ``out`` must not exist yet (or be
    empty): a complete dataset is only moved there once every category loads.
    """
    src = source(name)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; delete it or choose another --out")
    path = obtain_archive(src, archive, url, cache)
    verify(path, src.sha256 if sha256 is None else sha256)
    cats = tuple(categories) if categories else src.categories
    scratch = out.with_name(f".{out.name}.unpack")
    staged = out.with_name(f".{out.name}.staged")
    for folder in (scratch, staged):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        extract(path, scratch)
        CONVERTERS[name](scratch, staged, cats)
        check_dataset(staged, cats, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        staged.replace(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(staged, ignore_errors=True)
    return out
