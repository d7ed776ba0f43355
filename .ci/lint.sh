#!/usr/bin/env bash
# Lint and format checks, no GPU needed (docs/design.md §7): ruff (lint rules and
# formatter, configured in pyproject.toml) over the Python tree, clang-format
# (.clang-format) over the C++/CUDA sources.
#   bash .ci/lint.sh          check only: runs every check, exits 1 if any failed
#   bash .ci/lint.sh --fix    apply the safe ruff fixes and both formatters in place
# Installs the pinned tools into the active Python environment when they are missing or
# of another version: formatters' output changes between versions, so CI and
# contributors must run the same ones.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUFF_VERSION=0.17.6
CLANG_FORMAT_VERSION=23.1.5

fix=0
case "${1:-}" in
  "") ;;
  --fix) fix=1 ;;
  *) echo "usage: bash .ci/lint.sh [--fix]" >&2; exit 2 ;;
esac

installed() { python -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
if [[ "$(installed ruff)" != "$RUFF_VERSION" || "$(installed clang-format)" != "$CLANG_FORMAT_VERSION" ]]; then
  python -m pip install -q "ruff==$RUFF_VERSION" "clang-format==$CLANG_FORMAT_VERSION" || exit 2
fi

mapfile -t cxx_sources < <(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' \
                                        'tests/*.h' 'tests/*.cpp')

if (( fix )); then
  # Format, fix, format again (a fix can unformat); clang-format twice, as aligning
  # trailing comments can take it two passes to reach its fixed point.
  python -m ruff format . ; python -m ruff check --fix . ; python -m ruff format .
  clang-format -i "${cxx_sources[@]}" ; clang-format -i "${cxx_sources[@]}"
  exit 0
fi

failed=()
check() {  # check LABEL COMMAND...
  local label="$1"; shift
  echo "lint: $label"
  "$@" || failed+=("$label")
}
check "ruff check" python -m ruff check .
check "ruff format --check" python -m ruff format --check .
check "clang-format" clang-format --dry-run --Werror "${cxx_sources[@]}"

if (( ${#failed[@]} )); then
  echo "lint: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "lint: OK"
