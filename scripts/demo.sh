#!/usr/bin/env bash
# The demo on a fresh machine: sets up .venv (idempotent), then runs an example workflow on a real
# headless ComfyUI with this pack and the trained toy SD3 (toyworld/); results land in demo_output/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m scripts.demo "$@"
