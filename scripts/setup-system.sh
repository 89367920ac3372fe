#!/usr/bin/env bash
# System packages the tests need (run by scripts/setup.sh, as root in CI). Idempotent and quick
# when everything is already installed.
#   chromium: the headless browser test of the service's web page (tests/service/test_web_page.py).
#   java (openjdk-17-jre-headless): the real TorchServe tests (tests/torchserve/test_torchserve.py); without
#       it they skip on a developer machine and fail under CI (CI set).
set -euo pipefail

has_java() { command -v java >/dev/null 2>&1 || { [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; }; }

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium fonts-dejavu-core)
has_java || missing+=(openjdk-17-jre-headless)
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-system: missing ${missing[*]} and this is not root; the tests that need them will be skipped" >&2
    echo "setup-system: (and fail under CI); install with: sudo apt-get install -y ${missing[*]}" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-system: no apt-get here; install by hand: ${missing[*]}" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# openjdk's post-install script wants the man page folders that slim images leave out.
mkdir -p /usr/share/man/man1
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if command -v chromium >/dev/null 2>&1; then
    echo "setup-system: $(chromium --version 2>/dev/null || echo chromium)"
fi
if has_java; then
    echo "setup-system: $(java -version 2>&1 | head -n 1)"
else
    echo "setup-system: java is still missing after installing ${missing[*]}" >&2
    exit 1
fi
