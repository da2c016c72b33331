"""Test set-up: the repository root on sys.path (for `anchordiff_core`) and this folder (for the
helpers and fixtures). `tests/` is deliberately not a package: the repository root is the ComfyUI
pack's package, and importing it would pull in ComfyUI."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
