#!/usr/bin/env bash
# Run every test on a fresh machine: sets up .venv (scripts/setup_env.sh, idempotent), then pytest.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k capture
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
