#!/usr/bin/env bash
# Build the course labs (sources: book/labs/) offline with Jupyter Book 1, as one or both editions:
#
#   bash scripts/build_labs.sh student      # build/labs/student/_build/html     exercise code -> NotImplementedError
#   bash scripts/build_labs.sh instructor   # build/labs/instructor/_build/html  solutions filled in
#   bash scripts/build_labs.sh              # both
#
# Both editions come from the same sources.  `python -m vadlab.labs <edition> book/labs <dir>` writes the
# edition's sources into build/labs/<edition>/src (student: in cells tagged `solution` the code between
# `# BEGIN SOLUTION` and `# END SOLUTION` becomes a `raise NotImplementedError` placeholder), book/_static is
# added, and the folder is built with every notebook executed.
# - Student edition: the checks report "not implemented yet" instead of failing, and the cells that use the
#   student's function only do so once its check passed, so the book executes from top to bottom.
# - Instructor edition: VADLAB_LABS_STRICT=1 makes every check raise if a solution fails it, so a broken
#   solution (or a package change that breaks one) fails the build.
# Any notebook error or Sphinx warning fails the build.  LABS_OUT changes the output root (default build/labs).
# Run with the project's .venv on PATH (`make labs-student` / `make labs-instructor` do that).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_ROOT=${LABS_OUT:-build/labs}
case "${1:-both}" in
  student) editions=(student) ;;
  instructor) editions=(instructor) ;;
  both) editions=(student instructor) ;;
  *) echo "usage: $0 [student|instructor|both]" >&2; exit 2 ;;
esac
export TQDM_DISABLE=1
export PYDEVD_DISABLE_FILE_VALIDATION=1
for edition in "${editions[@]}"; do
  start=$(date +%s)
  src="$OUT_ROOT/$edition/src"
  rm -rf "$src"
  python -m vadlab.labs "$edition" book/labs "$src" >/dev/null
  cp -r book/_static "$src/_static"
  strict=0
  [ "$edition" = instructor ] && strict=1
  VADLAB_LABS_STRICT=$strict jupyter-book build --all -W --keep-going --path-output "$OUT_ROOT/$edition" "$src"
  echo "$edition edition of the labs built in $(( $(date +%s) - start )) s: $OUT_ROOT/$edition/_build/html/index.html"
done
