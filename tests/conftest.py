"""Test set-up: the repository root on sys.path (for `anchordiff_core`) and this folder (helpers are
imported as `fixtures.*`). `tests/` is deliberately not a package: the repository root is the
ComfyUI pack's package, and importing it would pull in ComfyUI."""
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process, CPU mode (see toyworld/comfy_env.py)."""
    from toyworld.comfy_env import import_comfy
    return import_comfy()


@pytest.fixture(scope="session")
def comfy_models_dir(tmp_path_factory, comfy):
    """Session tmp models dir holding the tiny SD3 variants (fixtures.tiny_sd3.VARIANTS)
    and the taesd3 fixture VAE, registered first in ComfyUI's model folder lists."""
    from fixtures.comfy_base import populate_models_dir
    from toyworld.comfy_env import set_models_dir
    d = populate_models_dir(tmp_path_factory.mktemp("comfy_models"))
    set_models_dir(d)
    return d


def pytest_terminal_summary(terminalreporter):
    """Timings recorded with fixtures.timings.record (server start-up, prompts), for issue notes."""
    from fixtures.timings import RECORDED
    if RECORDED:
        terminalreporter.section("timings (wall clock)")
        for name, seconds in RECORDED:
            terminalreporter.write_line(f"{seconds:8.3f} s  {name}")
