"""The student and instructor editions of the labs (see the package docstring)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path


_HEADER = re.compile(r"^# %%(.*)$")
_TAGS = re.compile(r"tags\s*=\s*\[([^\]]*)\]")
_BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION\s*$")
_END = re.compile(r"^\s*# END SOLUTION\s*$")
PLACEHOLDER = 'raise NotImplementedError("exercise: write your code here")'


def _is_solution_header(line: str) -> bool:
    m = _HEADER.match(line)
    if not m:
        return False
    tags = _TAGS.search(m.group(1))
    return bool(tags) and any(t.strip().strip("'\"") == "solution" for t in tags.group(1).split(","))


def student_version(source: str, name: str = "<lab>") -> str:
    """The student edition of a jupytext percent-format lab (see the module docstring).

    Inside a cell tagged ``solution``: each ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` block becomes
    ``# YOUR CODE HERE`` + ``raise NotImplementedError(...)`` at the marker's indentation; a solution cell
    without markers keeps only its header and gets the placeholder.  Markers outside solution cells, or
    unbalanced markers, raise ``ValueError`` naming the line.  All other lines are kept unchanged.
    """
    lines = source.splitlines(keepends=True)
    out: list[str] = []
    in_solution = False
    cell_has_marker = False
    cell_start = 0  # index in `out` of the current solution cell's first body line
    skipping = False
    nl = "\n"

    def close_unmarked_cell() -> None:
        # a solution cell without markers: drop its body, keep trailing blank lines (cell separation)
        body = out[cell_start:]
        trailing = []
        while body and not body[-1].strip():
            trailing.insert(0, body.pop())
        del out[cell_start:]
        out.extend(["# YOUR CODE HERE\n", PLACEHOLDER + "\n", *trailing])

    for no, line in enumerate(lines, 1):
        if _HEADER.match(line):
            if skipping:
                raise ValueError(f"{name}:{no}: a new cell starts inside a BEGIN SOLUTION block (missing END SOLUTION)")
            if in_solution and not cell_has_marker:
                close_unmarked_cell()
            in_solution = _is_solution_header(line)
            cell_has_marker = False
            out.append(line)
            cell_start = len(out)
            continue
        begin, end = _BEGIN.match(line), _END.match(line)
        if begin:
            if not in_solution:
                raise ValueError(f"{name}:{no}: '# BEGIN SOLUTION' in a cell that is not tagged solution")
            if skipping:
                raise ValueError(f"{name}:{no}: nested '# BEGIN SOLUTION'")
            indent = begin.group(1)
            out.append(f"{indent}# YOUR CODE HERE{nl}")
            out.append(f"{indent}{PLACEHOLDER}{nl}")
            skipping, cell_has_marker = True, True
            continue
        if end:
            if not skipping:
                raise ValueError(f"{name}:{no}: '# END SOLUTION' without a matching BEGIN SOLUTION")
            skipping = False
            continue
        if not skipping:
            out.append(line)
    if skipping:
        raise ValueError(f"{name}: the file ends inside a BEGIN SOLUTION block (missing END SOLUTION)")
    if in_solution and not cell_has_marker:
        close_unmarked_cell()
    return "".join(out)


EDITIONS = ("student", "instructor")


def write_lab_edition(src: str | Path, dst: str | Path, edition: str = "student") -> list[Path]:
    """Copy the lab folder ``src`` to ``dst`` as one edition; return the written lab files (``*.py``).

    ``student``: every ``*.py`` lab becomes its :func:`student_version`; ``instructor``: copied unchanged.
    The book title in ``_config.yml`` gets the edition's name; other files are copied as they are
    (build outputs and checkpoints are skipped).
    """
    if edition not in EDITIONS:
        raise ValueError(f"edition must be one of {EDITIONS}, got {edition!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"lab folder {src} does not exist")
    if dst.resolve() == src.resolve():
        raise ValueError("the copy must go to another folder than the sources")
    written = []
    for path in sorted(src.rglob("*")):
        if {"_build", "__pycache__", ".ipynb_checkpoints"} & set(path.parts):
            continue
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py":
            text = path.read_text()
            target.write_text(student_version(text, name=str(path)) if edition == "student" else text)
            written.append(target)
        elif path.name == "_config.yml" and path.parent == src:
            target.write_text(re.sub(r'^title: "(.*)"$', rf'title: "\1 ({edition} edition)"', path.read_text(),
                                     count=1, flags=re.M))
        else:
            shutil.copy2(path, target)
    return written


def write_student_labs(src: str | Path, dst: str | Path) -> list[Path]:
    """The student edition of the lab folder ``src`` in ``dst`` (see :func:`write_lab_edition`)."""
    return write_lab_edition(src, dst, "student")
