#!/usr/bin/env bash
# Build the Jupyter Book (book/) offline into book/_build/html, or into $BOOK_OUT/_build/html.
#
# - Every chapter is executed on every build (`execute_notebooks: force` in book/_config.yml, and
#   `--all` here so Sphinx re-reads every page even when only src/ or the pipeline's results changed).
#   BOOK_ALL=0 skips `--all`: an incremental build that re-executes only the changed chapters.
# - A notebook error fails the build (`raise_on_error`), and so does any Sphinx warning (-W).
# - Pipeline outputs (results/) must exist: run `dvc repro` first.  Set
#   VADLAB_BOOK_ALLOW_MISSING_RESULTS=1 to build without them (pages then say what is missing).
# Run with the project's .venv on PATH (`make book` does that).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BOOK_OUT:-book}
export TQDM_DISABLE=1                       # no progress bars in the build log
export PYDEVD_DISABLE_FILE_VALIDATION=1     # silence a debugger warning of the kernel
if [ "${VADLAB_BOOK_ALLOW_MISSING_RESULTS:-0}" != "1" ] && [ ! -f results/tables/per_category.csv ]; then
  echo "results/tables/per_category.csv is missing: run 'dvc repro' (make repro) before building the book," >&2
  echo "or set VADLAB_BOOK_ALLOW_MISSING_RESULTS=1 to build without the pipeline's results." >&2
  exit 1
fi
start=$(date +%s)
ALL=--all
[ "${BOOK_ALL:-1}" = "0" ] && ALL=
jupyter-book build $ALL -W --keep-going --path-output "$OUT" book
echo "book built in $(( $(date +%s) - start )) s: $OUT/_build/html/index.html"
