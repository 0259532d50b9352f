"""``python -m vadlab.labs student|instructor SRC DST``: write a copy of a lab folder as one edition."""

from __future__ import annotations

import sys

from .editions import EDITIONS, write_lab_edition


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in EDITIONS:
        print("usage: python -m vadlab.labs student|instructor SRC_DIR DST_DIR", file=sys.stderr)
        return 2
    for path in write_lab_edition(argv[1], argv[2], argv[0]):
        print(f"{argv[0]} edition: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main(sys.argv[1:]))
