#!/usr/bin/env bash
# Create .venv and install gnws with its development extras (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# system packages the tests need (Chromium for the web-page test, ...), when present
if [ -f scripts/setup-system.sh ]; then bash scripts/setup-system.sh; fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
