"""Atomic file writes: every output appears whole or not at all.

A file is written to a hidden temporary name in its own folder and then ``os.replace``d onto its
name, which is atomic on POSIX and Windows; a run killed mid-way leaves at most a ``.*.tmp`` file
(removed by the next run into that folder, see :func:`remove_stale`), never a truncated output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def replace(src: Path, dst: Path) -> None:
    """``os.replace`` (one place, so tests can interrupt a run between two outputs)."""
    os.replace(src, dst)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write ``value`` as indented, key-sorted JSON to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def remove_stale(folder: Path, names: tuple[str, ...]) -> None:
    """Remove the outputs ``names`` (files or folders) of an earlier run in ``folder`` and leftover temp files."""
    for name in names:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    if folder.is_dir():
        for leftover in folder.glob(f".*{TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)


def check_writable(path: str | os.PathLike, is_dir: bool = True) -> Path:
    """Raise a clear error now, before any work, when outputs cannot be written to ``path``.

    ``is_dir``: ``path`` is an output folder (it must not be a file); else an output file (it must not
    be a folder). The nearest existing folder must be writable.
    """
    path = Path(path)
    if is_dir and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {path} is a file, not a folder; choose a folder path")
    if not is_dir and path.is_dir():
        raise IsADirectoryError(f"--out {path} is a folder; give a file path such as {path / 'model.pt'}")
    parent = path if is_dir else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot create {path}: {parent} is a file, not a folder")
    try:  # a real probe: os.access says yes to root on a read-only mount
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write to {parent} ({err.strerror}); choose another --out") from None
    return path
