#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every check: ruff, mypy, import contracts, pytest.
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
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
