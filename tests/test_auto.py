"""The "auto" gate and step count (anchordiff_core.auto): the rule, its defaults in the pipeline and the
nodes, and on the trained toy model that it beats the paper's fixed values where the measurement says so."""
import pytest
import torch

import anchordiff_core as ad
from anchordiff_core import auto, pipeline
from anchordiff_core.maps import AttentionMaps
from synthetic import look_alike_scene

GRIDS = [(s, s) for s in (2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)]


def test_rule_is_exactly_the_paper_at_64x64_tokens():
    assert auto.auto_gate_percentile((64, 64)) == 98.0
    assert auto.auto_steps((64, 64)) == 160
    assert auto.gate_percentile_for("paper", (16, 16)) == 98.0 and auto.steps_for("paper", (16, 16)) == 160


def test_rule_is_monotone_and_sane_at_every_size():
    gates = [auto.auto_gate_percentile(g) for g in GRIDS]
    steps = [auto.auto_steps(g) for g in GRIDS]
    assert all(0.0 < p < 100.0 for p in gates), gates
    assert gates == sorted(gates) and steps == sorted(steps)   # bigger grids: stricter gate, more steps
    for (h, w), p, s in zip(GRIDS, gates, steps):
        n = h * w
        k = (1 - p / 100) * n                     # neighbours per token kept by the gate
        assert k <= n / 2, (h, k)                 # never (nearly) ungated
        assert k >= 1.0 or n < 16, (h, k)         # a token keeps at least itself and a neighbour from 4 x 4 up
        assert 1 <= s <= 4 * 160 * max(h, w) / 64 + 1, (h, s)
    # a non-square grid counts its tokens: same as the square of the same area
    assert auto.auto_gate_percentile((32, 128)) == auto.auto_gate_percentile((64, 64))
    assert auto.auto_steps((32, 128)) == auto.auto_steps((64, 64))
    # the values docs/DESIGN.md and the node tooltips quote
    assert auto.auto_gate_percentile((16, 16)) == 93.75 and auto.auto_steps((16, 16)) == 40
    assert auto.auto_gate_percentile((96, 96)) == pytest.approx(100 - 8192 / 9216) and auto.auto_steps((96, 96)) == 240


@pytest.mark.parametrize("grid", [(0, 4), (-1, 8), (8,), "64x64", (8.5, 8), None])
def test_rule_refuses_bad_grids(grid):
    with pytest.raises(ValueError, match="grid must be two positive whole numbers"):
        auto.auto_gate_percentile(grid)
    with pytest.raises(ValueError, match="grid must be two positive whole numbers"):
        auto.auto_steps(grid)


@pytest.mark.parametrize("bad", ["Auto!", "98%", -1, 100.5, float("nan"), True, None])
def test_settings_refuse_bad_values(bad):
    with pytest.raises(ValueError, match="'auto', 'paper' or a number from 0 to 100"):
        auto.gate_percentile_for(bad, (16, 16))


@pytest.mark.parametrize("bad", ["many", -1, 2.5, True, None])
def test_steps_refuse_bad_values(bad):
    with pytest.raises(ValueError, match="'auto', 'paper' or a whole number >= 0"):
        auto.steps_for(bad, (16, 16))


def _maps(h=16, w=16):
    a_ii, o_ii, region = look_alike_scene(h, w)
    n = h * w
    a_ci = torch.stack([(region == 1).float(), (region == 2).float()])[None, None]  # [1, 1, K=2, N]
    return AttentionMaps(("a", "b"), (h, w), (16 * h, 16 * w), a_ci, a_ci.clone(), a_ii[None, None], o_ii[None, None], (0,))


def test_pipeline_defaults_are_auto_and_paper_is_one_word_away():
    maps = _maps()
    anchors = pipeline.pick_anchors(maps)
    default = pipeline.build_graphs(maps)
    assert default.gate_percentile == auto.auto_gate_percentile((16, 16)) != 98.0
    assert pipeline.build_graphs(maps, "paper").gate_percentile == 98.0
    assert pipeline.build_graphs(maps, 90.0).gate_percentile == 90.0
    assert pipeline.build_graphs(maps, None).gate_percentile is None
    graph = default.graphs[0]

    def steps_run(*setting):
        seen = []
        heat = pipeline.propagate_anchors(default, anchors, *setting, progress=lambda done, total: seen.append(total))
        return heat.values[0], set(seen)

    heat, seen = steps_run()
    assert seen == {auto.auto_steps((16, 16))} and torch.equal(heat, ad.propagate(graph, anchors.indices[0], seen.pop()))
    assert steps_run("paper")[1] == {160} and steps_run(7)[1] == {7}
    with pytest.raises(ValueError, match="'auto', 'paper'"):
        pipeline.build_graphs(maps, "strict")
    with pytest.raises(ValueError, match="'auto', 'paper'"):
        pipeline.propagate_anchors(default, anchors, "long")


@pytest.fixture(scope="module")
def nodes(comfy):
    from pathlib import Path
    from toyworld import comfy_env
    repo = Path(__file__).resolve().parents[1]
    found = comfy_env.get_nodes(extras=True)
    if "AnchorDiffBuildGatedGraph" not in found.NODE_CLASS_MAPPINGS:
        assert comfy_env.load_custom_node_pack(repo)
    return found.NODE_CLASS_MAPPINGS


def test_nodes_default_to_auto_with_paper_and_custom_choices(nodes, monkeypatch):
    build, prop = nodes["AnchorDiffBuildGatedGraph"], nodes["AnchorDiffPropagate"]
    for node, name, paper in ((build, "gate_setting", "paper (98th percentile)"), (prop, "steps_setting", "paper (160 steps)")):
        inputs = node.GET_SCHEMA().get_v1_info(node).input
        kind, spec = inputs["optional"][name]
        assert kind == "COMBO" and spec["options"] == ["auto", paper, "custom"], spec
        assert spec["default"] == "auto" and "auto =" in spec["tooltip"]
        assert list(inputs["required"])[-1] != name   # added at the end: old workflows' widget values keep their places
    maps = _maps()
    anchors = pipeline.pick_anchors(maps)
    old_saved = build.execute(maps, 98.0, "", True).args[0]      # a workflow saved before the setting existed
    assert old_saved.gate_percentile == auto.auto_gate_percentile((16, 16))
    assert build.execute(maps, 93.0, "", True, "paper (98th percentile)").args[0].gate_percentile == 98.0
    assert build.execute(maps, 93.0, "", True, "custom").args[0].gate_percentile == 93.0
    assert build.execute(maps, 93.0, "", False, "auto").args[0].gate_percentile is None
    node_pipeline = prop.execute.__func__.__globals__["pipeline"]   # the pack's own import of the pipeline
    real, used = node_pipeline.propagate_anchors, []
    monkeypatch.setattr(node_pipeline, "propagate_anchors", lambda g, a, steps, *rest: used.append(steps) or real(g, a, steps, *rest))
    heat = prop.execute(old_saved, anchors, 7).args[0].values[0]   # keep: regions holding an anchor (the default)
    plain = ad.propagate(old_saved.graphs[0], anchors.indices[0], auto.auto_steps((16, 16)))
    assert torch.equal(heat, ad.anchor_regions(plain, anchors.indices[0], (16, 16)))
    prop.execute(old_saved, anchors, 7, "paper (160 steps)")
    prop.execute(old_saved, anchors, 7, "custom")
    assert used == [auto.auto_steps((16, 16)), 160, 7]
    with pytest.raises(Exception, match="gate_setting must be one of auto"):
        build.execute(maps, 98.0, "", True, "strict")
    with pytest.raises(Exception, match="steps_setting must be one of auto"):
        prop.execute(old_saved, anchors, 7, "forever")


# On the trained toy SD3, VALIDATION scenes, maps recorded once here through ComfyUI (Look At Image,
# record_at 0.85), scored by the benchmark's own code (benchmarks/bench_sizes.py) with the true object
# centre as the anchor (isolates the graph). Measured with the committed model: at 256 px (16 x 16 tokens)
# auto 0.634 vs paper 0.595 mean phrase mIoU on these 8 scenes (6 of 8 better); at 128 px (8 x 8) auto
# 0.424 vs paper 0.431 on the first 4 scenes (the toy grounds worse off its training size; auto may not lose
# more than 0.01 there). benchmarks/results/sizes.md has the full grid.
TOY_SCENES = {256: 8, 128: 4}


@pytest.fixture(scope="module")
def toy_scores(comfy):
    import numpy as np
    from benchmarks import bench_sizes
    from toyworld import SPLITS, make_scene
    from toyworld.comfy_run import ToyComfy
    torch.set_flush_denormal(True)
    toy = ToyComfy()
    out = {}
    for size, count in TOY_SCENES.items():
        auto_m, paper_m = [], []
        for seed in SPLITS["val"].seeds(count):
            rec = bench_sizes.record(toy, seed, size, 0.85, None)
            scene = make_scene(seed, size)
            grid = tuple(rec["grid"])
            a_steps = auto.steps_for("auto", grid)
            a = bench_sizes.scene_scores(rec, scene, auto.gate_percentile_for("auto", grid), [a_steps])
            p = bench_sizes.scene_scores(rec, scene, auto.gate_percentile_for("paper", grid), [auto.steps_for("paper", grid)])
            auto_m.append(np.mean(a["true centre"][a_steps]["miou"]))
            paper_m.append(np.mean(p["true centre"][auto.PAPER_STEPS]["miou"]))
        out[size] = (float(np.mean(auto_m)), float(np.mean(paper_m)))
    return out


def test_auto_beats_the_paper_values_on_the_toy_at_256_px(toy_scores):
    auto_miou, paper_miou = toy_scores[256]
    assert auto_miou >= paper_miou + 0.02, toy_scores


def test_auto_is_no_worse_than_the_paper_values_on_the_toy_at_128_px(toy_scores):
    auto_miou, paper_miou = toy_scores[128]
    assert auto_miou >= paper_miou - 0.01, toy_scores
