"""Put a params set (configs/<name>.yaml) into params.yaml: its top-level keys replace params.yaml's.

    python configs/apply.py configs/mvtec.yaml [--params params.yaml]

Only the blocks of the keys the set names are rewritten, as text, so the rest of params.yaml keeps
its comments and layout; the result is checked to parse to params.yaml's values with those keys
replaced.  A key the set names must already exist in params.yaml (a typo would otherwise add a
setting no stage reads).  Undo with ``git checkout params.yaml``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

_TOP_KEY = re.compile(r"^([A-Za-z_][\w-]*)\s*:")


def _blocks(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Top-level key -> (first line, end line) of its block; comment lines just above a key belong to it."""
    starts = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _TOP_KEY.match(line))]
    spans = {}
    for n, (i, key) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        while end - 1 > i and (lines[end - 1].startswith("#") or not lines[end - 1].strip()):
            end -= 1  # leave the next key's comment header (and blank lines) to it
        spans[key] = (i, end)
    return spans


def apply(params_text: str, set_text: str) -> str:
    """params.yaml text with every top-level block named in ``set_text`` replaced by the set's block."""
    params, new = yaml.safe_load(params_text) or {}, yaml.safe_load(set_text) or {}
    unknown = sorted(set(new) - set(params))
    if unknown:
        raise KeyError(f"the params set names {unknown}, which params.yaml does not have; "
                       f"params.yaml's keys: {', '.join(params)}")
    lines, set_lines = params_text.splitlines(keepends=True), set_text.splitlines(keepends=True)
    own, theirs = _blocks(lines), _blocks(set_lines)
    for key in sorted(new, key=lambda k: own[k][0], reverse=True):  # bottom up: earlier spans stay valid
        start, end = own[key]
        a, b = theirs[key]
        block = "".join(set_lines[a:b]).rstrip("\n") + "\n"
        lines[start:end] = [block]
    out = "".join(lines)
    expected = {**params, **new}
    if yaml.safe_load(out) != expected:
        raise RuntimeError("rewriting params.yaml went wrong (the result does not parse to the merged values); "
                           "params.yaml was not changed")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params_set", help="e.g. configs/mvtec.yaml")
    parser.add_argument("--params", default="params.yaml", help="file to rewrite (default: params.yaml)")
    args = parser.parse_args(argv)
    target = Path(args.params)
    text = apply(target.read_text(), Path(args.params_set).read_text())
    target.write_text(text)
    keys = ", ".join(yaml.safe_load(Path(args.params_set).read_text()))
    print(f"{target}: replaced {keys} with {args.params_set} (undo: git checkout {target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
