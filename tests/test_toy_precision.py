"""The recorder's fast and compact precisions against exact on the trained toy SD3 (toyworld/weights):
masks from the true centre of each phrase, as tests/test_toy_model.py measures them.

Measured on the 12 validation scenes (35 phrases, 2.29 M mask pixels) on this project's CPU:
fast changes no pixel; compact (A_II stored float16) changes 61 pixels of one phrase (a gate edge
near tau flips). Asserted with slack: another CPU's BLAS may round differently."""
import pytest
import torch

from toyworld import SPLITS, make_scene
from toyworld.grounding import central_token

SCENES = 12


@pytest.fixture(scope="module")
def toy(comfy):
    from toyworld.comfy_run import ToyComfy
    torch.set_flush_denormal(True)
    return ToyComfy()


def masks(toy, scene, phrases, precision, monkeypatch):
    """Look At Image (which records in exact) with its record spec made in `precision`."""
    import functools
    import sys

    from anchordiff_core import build_gated_graph, propagate, to_mask

    record = next(m for name, m in sys.modules.items() if name.endswith("nodes.record") and hasattr(m, "_record_spec"))
    original = getattr(record._record_spec, "func", record._record_spec)
    monkeypatch.setattr(record, "_record_spec", functools.partial(original, precision=precision))
    maps = toy.look(scene.image, scene.caption, [c.name for c in phrases], 0.85)
    assert maps.a_ii.dtype == (torch.float16 if precision == "compact" else torch.float32)
    a_ii, o_ii = maps.graph_inputs(0)
    heat = propagate(build_gated_graph(a_ii, o_ii), torch.tensor([central_token(c.mask, maps.grid) for c in phrases]))
    return to_mask(heat, maps.grid, scene.image.shape[:2]).numpy() > 0.5


def test_fast_and_compact_masks_against_exact_on_the_toy(toy, monkeypatch):
    changed = {"fast": 0, "compact": 0}
    total = 0
    for seed in SPLITS["val"].seeds(SCENES):
        scene = make_scene(seed)
        phrases = [c for c in scene.concepts if c.level == "phrase"]
        exact = masks(toy, scene, phrases, "exact", monkeypatch)
        total += exact.size
        for precision in changed:
            changed[precision] += int((masks(toy, scene, phrases, precision, monkeypatch) != exact).sum())
    print(f"mask pixels changed against exact, of {total}: {changed}")
    assert changed["fast"] <= 1e-5 * total
    assert changed["compact"] <= 1e-4 * total
