#!/usr/bin/env bash
# Run every test on a fresh machine: sets up .venv (scripts/setup_env.sh) and the browser for the
# UI test (scripts/install_browser.sh: Debian's Chromium), both idempotent, then pytest.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k capture
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
bash scripts/install_browser.sh
exec .venv/bin/python -m pytest "$@"
