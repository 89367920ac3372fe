#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every check: ruff, mypy, import contracts, pytest, then the container test
# (scripts/container-test.sh: builds and runs the images; it skips, saying why, only where neither Docker nor
# podman can be had and CI is not set). Fails if any of them fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check .
echo "== mypy"; mypy models service gnws
echo "== import contracts"; lint-imports
if [ -f scripts/lint-docker.sh ]; then echo "== docker lint"; bash scripts/lint-docker.sh; fi
echo "== pytest"
set +e
pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; rc=1; fi
echo "== container test"
if ! bash scripts/container-test.sh; then
    echo "container test failed" >&2
    [ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"
