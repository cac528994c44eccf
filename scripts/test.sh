#!/usr/bin/env bash
# Set up the venv and run every check: ruff, mypy --strict, and pytest over all of tests/
# (the slow real-process tests included). Exits non-zero if any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS=test bash scripts/bootstrap.sh

failed=()

echo "==> ruff check"
.venv/bin/ruff check . || failed+=(ruff)

echo "==> mypy (strict, see pyproject.toml)"
.venv/bin/mypy || failed+=(mypy)

echo "==> pytest"
set +e
.venv/bin/pytest "$@"
rc=$?
set -e
case $rc in
    0) ;;
    5) echo "pytest collected no tests: that is a failure here" >&2; failed+=(pytest) ;;
    *) failed+=(pytest) ;;
esac

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
