#!/usr/bin/env bash
# What tests/test_browser.py needs besides .venv: Debian's Chromium and playwright-python.
# Idempotent: installs only what is missing. Run after scripts/setup_env.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CHROMIUM=/usr/bin/chromium
PY="$ROOT/.venv/bin/python"

if [ ! -x "$CHROMIUM" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "install_browser: apt-get install chromium"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
"$CHROMIUM" --version 2>/dev/null | grep -i chromium || { echo "install_browser: $CHROMIUM does not run" >&2; exit 1; }

if [ ! -x "$PY" ]; then
    echo "install_browser: no $PY; run scripts/setup_env.sh first" >&2
    exit 1
fi
if ! "$PY" -c "import playwright.sync_api" 2>/dev/null; then
    echo "install_browser: pip install playwright"
    "$PY" -m pip install -q -c requirements/constraints.txt "$(grep -E '^playwright==' requirements/test.txt)"
fi
"$PY" -c "import importlib.metadata as m; print('playwright', m.version('playwright'))"
