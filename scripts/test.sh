#!/usr/bin/env bash
# Run every test on a fresh machine: sets up .venv (scripts/setup_env.sh: ComfyUI 0.3.75),
# .venv-comfy033 (scripts/setup_comfy033.sh: ComfyUI 0.33.0, from ../shared/vendor) and the browser
# for the UI test (scripts/install_browser.sh: Debian's Chromium), all idempotent, then pytest:
#   1. every test on ComfyUI 0.3.75 with its frontend 1.32.9 (browser test: classic and Nodes 2.0);
#   2. the capture, server, workflow, browser and SAM3-prompt tests on ComfyUI 0.33.0 with its frontend 1.49.6;
#   3. the browser test on ComfyUI 0.33.0 with the newest frontend, 1.58.1.
# Each run's tests pick the ComfyUI of the venv whose python runs them (toyworld/comfy_env.py).
# Extra arguments go to every pytest run, e.g.  bash scripts/test.sh -k capture  (a run they leave
# without tests counts as passed); ANCHORDIFF_MATRIX=0 runs only the first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
bash scripts/setup_comfy033.sh
bash scripts/install_browser.sh

NEWEST_FRONTEND=1.58.1  # scripts/setup_comfy033.sh installs it in .venv-comfy033/frontends/
failed=()
run() {  # run NAME ENV... -- PYTEST-ARGS...
    local name="$1"; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    echo "=== $name"
    local t0=$SECONDS rc=0
    env "${envs[@]}" "$@" || rc=$?
    echo "=== $name: exit $rc in $(( SECONDS - t0 )) s"
    # 5: pytest collected nothing (extra arguments deselected all of this run's tests)
    if [ "$rc" -ne 0 ] && { [ "$rc" -ne 5 ] || [ "$name" = "ComfyUI 0.3.75" ]; }; then failed+=("$name"); fi
}

run "ComfyUI 0.3.75" -- .venv/bin/python -m pytest "$@"
if [ "${ANCHORDIFF_MATRIX:-1}" != "0" ]; then
    run "ComfyUI 0.33.0" -- .venv-comfy033/bin/python -m pytest \
        tests/test_capture.py tests/test_flux_capture.py tests/test_flux2_capture.py tests/test_chroma_capture.py tests/test_qwen_image_capture.py tests/test_server.py tests/test_workflows.py tests/test_browser.py \
        tests/test_segmenter_prompts.py tests/test_sam3_workflows.py "$@"
    run "ComfyUI 0.33.0, frontend $NEWEST_FRONTEND" ANCHORDIFF_FRONTEND="$NEWEST_FRONTEND" -- \
        .venv-comfy033/bin/python -m pytest tests/test_browser.py "$@"
fi
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
