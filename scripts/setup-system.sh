#!/usr/bin/env bash
# System packages the tests need (run by scripts/setup.sh, as root in CI). Idempotent and quick
# when everything is already installed.
#   chromium: the headless browser test of the service's web page (tests/service/test_web_page.py).
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-system: chromium is missing and this is not root; the web-page test will be skipped" >&2
    echo "setup-system: install it with: sudo apt-get install -y chromium" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-system: no apt-get here; install Chromium by hand for the web-page test" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "setup-system: installed $(chromium --version 2>/dev/null || echo chromium)"
