"""The fused Triton kernels (anchordiff_core/fused_attention.py) on CPU tensors, in triton's
interpreter, for tests on a machine without a GPU.

Import-order quirk: triton decides "interpreted or compiled" when a kernel is *defined*, i.e. when
the kernels module is imported, from TRITON_INTERPRET. So the module is dropped from sys.modules and
imported afresh with TRITON_INTERPRET=1, and dropped again afterwards (a later fast recording on a CPU
must not find interpreted kernels). triton itself must have been imported *without* the variable, as
a fast recording on a CPU does first: the kernels may not call triton's compiled-only standard
library, and this is how the tests make sure."""
import contextlib
import importlib
import sys

import pytest


def _forget(package: str) -> None:
    sys.modules.pop(f"{package}.fused_attention", None)
    module = sys.modules.get(package)
    if module is not None and hasattr(module, "fused_attention"):
        delattr(module, "fused_attention")


@contextlib.contextmanager
def interpreted_kernels(package: str = "anchordiff_core"):
    """`package`.fused_attention imported under TRITON_INTERPRET=1 for the duration. `package`: the
    name anchordiff_core was imported under (ComfyUI imports the pack's copy under its folder path)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        _forget(package)
        module = importlib.import_module(f"{package}.fused_attention")
        assert module.interpreted()
        try:
            yield module
        finally:
            patch.delenv("TRITON_INTERPRET", raising=False)
            _forget(package)
