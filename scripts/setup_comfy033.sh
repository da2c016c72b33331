#!/usr/bin/env bash
# Idempotent second test environment: ComfyUI 0.33.0 (what users run today) beside 0.3.75.
#   .venv-comfy033/                 python venv: torch 2.13.0 CPU, 0.33.0's requirements (its frontend,
#                                   templates and docs pins conflict with 0.3.75's), test tools
#   .venv-comfy033/comfyui/         ComfyUI 0.33.0 from ../shared/vendor/comfyui-0.33.0.tar.gz
#   .venv-comfy033/frontends/X/     extra frontend packages for the browser test (--front-end-root)
# Tests pick the tree with ANCHORDIFF_COMFYUI_DIR and run under this venv's python (scripts/test.sh).
# Re-running is cheap: a marker holding a hash of the inputs skips finished work.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv-comfy033"
COMFY_DIR="$VENV/comfyui"
TARBALL="${ANCHORDIFF_COMFY033_TARBALL:-$ROOT/../shared/vendor/comfyui-0.33.0.tar.gz}"
TORCH_PIN="torch==2.13.0"
TORCHVISION_PIN="torchvision==0.28.0"   # the release for torch 2.13; its CUDA ops are emptied below
EXTRA_FRONTENDS=(1.58.1)                # besides 0.33.0's pin (1.49.6, requirements/comfy033.txt)
MARKER="$VENV/.anchordiff_setup_done"
export PIP_PROGRESS_BAR=off PIP_DISABLE_PIP_VERSION_CHECK=1

inputs_hash() {
    cat scripts/setup_comfy033.sh requirements.txt requirements/comfy033.txt requirements/nodeps.txt requirements/constraints.txt \
        | sha256sum | cut -d' ' -f1
    sha256sum "$TARBALL" | cut -d' ' -f1
}
if [ ! -f "$TARBALL" ]; then
    echo "setup_comfy033: $TARBALL not found (ComfyUI 0.33.0 lives in ../shared/vendor beside the clone)" >&2
    exit 1
fi
HASH="$(inputs_hash | sha256sum | cut -d' ' -f1)"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$HASH" ] && [ -f "$COMFY_DIR/main.py" ]; then
    echo "setup_comfy033: up to date ($MARKER)"
    exit 0
fi

t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_comfy033: creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip)

"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "$TORCH_PIN"
"${PIP[@]}" install -q -r requirements/comfy033.txt -c requirements/constraints.txt
"${PIP[@]}" install -q --no-deps -r requirements/nodeps.txt "$TORCHVISION_PIN"
# torchvision's PyPI build registers CUDA-only meta kernels at import, which fails on CPU torch;
# nothing SD3 needs calls them (see ../shared/vendor/README.md).
META="$("$PY" -c "import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec('torchvision').origin), '_meta_registrations.py'))")"
: > "$META"
"$PY" -c "import torchvision" || { echo "setup_comfy033: torchvision does not import" >&2; exit 1; }

for v in "${EXTRA_FRONTENDS[@]}"; do
    if [ ! -d "$VENV/frontends/$v/comfyui_frontend_package/static" ]; then
        rm -rf "$VENV/frontends/$v"
        "${PIP[@]}" install -q --no-deps --target "$VENV/frontends/$v" "comfyui-frontend-package==$v"
    fi
done

if [ ! -f "$COMFY_DIR/main.py" ] || ! grep -q '"0.33.0"' "$COMFY_DIR/comfyui_version.py"; then
    rm -rf "$COMFY_DIR.tmp" && mkdir -p "$COMFY_DIR.tmp"
    # its tests/ would shadow ours once the tree is first on sys.path; the example paths file
    # is only an example, and a real extra_model_paths.yaml must not be there either
    tar xzf "$TARBALL" -C "$COMFY_DIR.tmp" --exclude=./tests --exclude=./tests-unit
    rm -f "$COMFY_DIR.tmp/extra_model_paths.yaml"
    rm -rf "$COMFY_DIR" && mv "$COMFY_DIR.tmp" "$COMFY_DIR"
fi

"${PIP[@]}" install -q --no-deps -c requirements/constraints.txt -e .

"$PY" -c "import torch, sys; v = torch.__version__; \
sys.exit(0 if v.startswith('2.13.0') and torch.version.cuda is None else f'bad torch {v} cuda={torch.version.cuda}')"
ANCHORDIFF_COMFYUI_DIR="$COMFY_DIR" "$PY" -c "\
from toyworld.comfy_env import import_comfy; import_comfy(); import comfy.sd" 2>"$VENV/.smoke.log" \
    || { cat "$VENV/.smoke.log" >&2; echo "setup_comfy033: ComfyUI 0.33.0 does not import" >&2; exit 1; }

echo "$HASH" > "$MARKER"
echo "setup_comfy033: done in $(( $(date +%s) - t0 )) s"
