"""A slice of the quality benchmark (benchmarks/bench_quality.py) on two validation scenes of the toy world:
fails when a method's wiring breaks (the diffusers capture no longer matches the ComfyUI one, an ablation
silently equals the paper, the edge refinement is not applied). The numbers themselves are the benchmark's."""

import pytest
import torch

SEEDS = (1_000_002, 1_000_004)  # validation: a look-alike scene with 4 objects, a single-object scene


@pytest.fixture(scope="module")
def result(comfy):
    from benchmarks import bench_quality
    from toyworld.comfy_run import ToyComfy
    from toyworld.to_diffusers import ToyDiffusers

    torch.set_flush_denormal(True)
    toy = ToyComfy()
    return bench_quality, bench_quality.run(toy, ToyDiffusers(), SEEDS, 256, 0.85, log=None, with_figure=False), toy


def test_diffusers_capture_matches_the_comfyui_capture(result):
    bq, r, _ = result
    agree = r["capture agreement"]
    for field in ("a_ci", "ca_scores", "a_ii", "o_ii", "seg4diff"):
        assert agree[f"{field} max |diff| / max |value|"]["max"] < 1e-4, field
    assert agree["paper anchors equal"]["min"] == 1.0
    assert agree["paper heat max |diff|"]["max"] < 1e-4
    assert agree["paper mask IoU (per concept)"]["min"] > 0.99
    paper, diffusers = r["methods"][bq.PAPER], r["methods"][bq.DIFFUSERS]
    for group in ("look-alike pairs", "unrelated pairs"):
        for key in ("miou_fg", "map_fg", "nar"):
            assert diffusers[group][key] == pytest.approx(paper[group][key], abs=1e-6)


def test_every_method_has_every_measurement(result):
    bq, r, _ = result
    names = set(r["methods"])
    assert {bq.PAPER, bq.PAPER_AUTO, bq.DEFAULT, bq.DIFFUSERS, bq.TRUE_CENTRE, "AnchorDiff, no gate", "AnchorDiff, no W_cos (W_attn weights)",
            "AnchorDiff, graph layer 1 only", "AnchorDiff, graph layer 2 only", "Cross-attention (A_CI alone)",
            "ConceptAttention", "Seg4Diff"} <= names
    for name, m in r["methods"].items():
        assert {"look-alike pairs", "unrelated pairs", "single object", "ms per image"} <= set(m), name
        assert m["look-alike pairs"]["n"] == 2 and m["single object"]["n_images"] == 1, name
        assert m["ms per image"]["wall"] > 0
    assert r["methods"][bq.TRUE_CENTRE]["anchor accuracy"] == 1.0


def test_ablations_are_not_the_paper_in_disguise(result, monkeypatch):
    """Each ablation's graph differs from the paper's, on a real recording. (Their heat may still equal the
    paper's: in a two-token component the stationary heat is uniform whatever the weights; the benchmark
    reports how often.)"""
    from toyworld import make_scene

    bq, r, toy = result
    scene = make_scene(SEEDS[0], 256)
    maps = toy.look(scene.image, scene.caption, [c.name for c in scene.concepts], 0.85)
    built = []
    real = bq.build_gated_graph
    monkeypatch.setattr(bq, "build_gated_graph", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    graphs = {}
    for name, fn in bq.methods(maps, [c.mask for c in scene.concepts]).items():
        del built[:]
        fn()
        if built:
            graphs[name] = built[-1].transition_t.to_dense()
    paper = graphs.pop(bq.PAPER)
    assert {"AnchorDiff, no gate", "AnchorDiff, no W_cos (W_attn weights)", "AnchorDiff, graph layer 1 only",
            "AnchorDiff, graph layer 2 only"} <= set(graphs)
    for name in ("AnchorDiff, no gate", "AnchorDiff, no W_cos (W_attn weights)", "AnchorDiff, graph layer 1 only",
                 "AnchorDiff, graph layer 2 only"):
        assert (graphs[name] - paper).abs().max() > 1e-3, name
    assert torch.equal(graphs[bq.TRUE_CENTRE], paper)  # anchors differ, the graph is the paper's
    assert r["methods"]["AnchorDiff, anchors without pre_only block"]["share of concepts with the paper's heat"] < 1.0
    assert r["methods"][bq.DIFFUSERS]["share of concepts with the paper's heat"] == 1.0


def test_edge_refinement_is_measured_on_both_rows(result):
    bq, r, _ = result
    for method in bq.REFINED:
        plain, refined = r["edges"][method], r["edges"][f"{method}, refined"]
        assert plain["n_images"] == refined["n_images"] == 5  # the phrases of both scenes
        assert abs(plain["bf"] - refined["bf"]) > 1e-3 and abs(plain["miou"] - refined["miou"]) > 1e-3, method
    md = bq.markdown(r | {"command": "x", "total": {"wall_s": 1, "cpu_s": 1}})
    assert "image-concept pairs" in md and "boundary F, refined" in md
