"""ComfyUI's own classes (MMDiT, TAESD, SD3Tokenizer) for training: the toy model must be exactly
what ComfyUI's loaders build. ComfyUI is found as the tests find it (tests/fixtures/comfy_env.py:
$ANCHORDIFF_COMFYUI_DIR, else .venv/comfyui), in CPU mode."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_comfy():
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from fixtures.comfy_env import import_comfy as _import
    return _import()
