"""Odd values at the nodes' inputs, called in-process: NaN and +-inf in every FLOAT input, numbers
that are not plain numbers ('²', '①'), ComfyUI's weight syntax with absurd weights, lone
surrogates, an unknown precision. Each is refused at the node that got it, with a message that
names the input and the fix (tests/test_server.py sends NaN through the real server)."""
import math
from pathlib import Path

import pytest
import torch

from anchordiff_core import pipeline
from anchordiff_core.concepts import concept_number, parse_concepts
from anchordiff_core.maps import AttentionMaps
from synthetic import look_alike_scene

REPO = Path(__file__).resolve().parents[1]
BAD_FLOATS = [math.nan, math.inf, -math.inf]


@pytest.fixture(scope="module")
def env(comfy):
    from toyworld import comfy_env
    from fixtures.comfy_base import TEST_NODES_DIR
    from toyworld.comfy_clip import make_fixture_clip

    nodes = comfy_env.get_nodes(extras=True)
    if "AnchorDiffMask" not in nodes.NODE_CLASS_MAPPINGS:
        assert comfy_env.load_custom_node_pack(REPO)
    if "AnchorDiffTestCLIP" not in nodes.NODE_CLASS_MAPPINGS:
        assert comfy_env.load_custom_node_pack(TEST_NODES_DIR)
    errors = comfy_env.pack_module(REPO, ".nodes.errors")  # the loaded pack's own error type
    return errors, nodes.NODE_CLASS_MAPPINGS, make_fixture_clip()


def _maps(h=16, w=16):
    a_ii, o_ii, region = look_alike_scene(h, w)
    a_ci = torch.stack([(region == 1).float(), (region == 2).float()])[None, None]
    return AttentionMaps(("cat", "dog"), (h, w), (16 * h, 16 * w), a_ci, a_ci.clone(), a_ii[None, None], o_ii[None, None], (0,))


def _calls(N):
    """node, input, call(value): every FLOAT input of our nodes, the others at valid values."""
    maps = _maps()
    heat = pipeline.propagate_anchors(pipeline.build_graphs(maps), pipeline.pick_anchors(maps))
    return [
        ("AnchorDiffRecordAttention", "record_at", lambda v: N["AnchorDiffRecordAttention"].execute(None, None, v, -1, "", -1, 2)),
        ("AnchorDiffLookAtImage", "record_at", lambda v: N["AnchorDiffLookAtImage"].execute(None, None, [], {}, 0, v, "", -1)),
        ("AnchorDiffAnchorSelect", "min_distance", lambda v: N["AnchorDiffAnchorSelect"].execute(maps, 2, v, 0.5, "", False)),
        ("AnchorDiffAnchorSelect", "min_relative_score", lambda v: N["AnchorDiffAnchorSelect"].execute(maps, 2, 8.0, v, "", False)),
        ("AnchorDiffBuildGatedGraph", "gate_percentile", lambda v: N["AnchorDiffBuildGatedGraph"].execute(maps, v, "", True, "custom")),
        ("AnchorDiffMask", "fixed_threshold", lambda v: N["AnchorDiffMask"].execute(heat, "", "fixed", v)),
    ]


def test_every_float_input_is_checked_here(env):
    """The list above is every FLOAT input the nodes declare (a new one must be added, and checked)."""
    _, N, _ = env
    declared = sorted((name, spec.id) for name, cls in N.items() if name.startswith("AnchorDiff") and not name.startswith("AnchorDiffTest")
                      for spec in cls.define_schema().inputs if spec.get_io_type() == "FLOAT")
    assert declared == sorted((node, name) for node, name, _ in _calls(N))


@pytest.mark.parametrize("value", BAD_FLOATS, ids=["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused_at_their_node(env, value):
    errors, N, _ = env
    for node, name, call in _calls(N):
        with pytest.raises(errors.AnchorDiffError) as refused:
            call(value)
        message = str(refused.value)
        assert message.startswith(f"{name} is {value!r} in "), message
        assert "needs a finite number from" in message and "default" in message


def test_valid_floats_still_run(env):
    _, N, _ = env
    maps = _maps()
    assert N["AnchorDiffAnchorSelect"].execute(maps, 2, 0.0, 0.0, "", False).args[0].indices[0].shape == (2, 2)
    assert N["AnchorDiffMask"].execute(
        pipeline.propagate_anchors(pipeline.build_graphs(maps), pipeline.pick_anchors(maps)), "", "fixed", 0.0).args[0].shape == (2, 256, 256)


# ------------------------------------------------------------------------------ text that looks like a number
@pytest.mark.parametrize("text, number", [("2", 2), (" 12 ", 12), ("０２", 2), ("²", None), ("①", None), ("two", None), ("", None)])
def test_concept_number_is_only_a_plain_number(text, number):
    assert concept_number(text) == number


@pytest.mark.parametrize("who", ["²", "①"])
def test_mask_concept_that_looks_like_a_number(env, who):
    errors, N, _ = env
    maps = _maps()
    heat = pipeline.propagate_anchors(pipeline.build_graphs(maps), pipeline.pick_anchors(maps))
    with pytest.raises(errors.AnchorDiffError, match=f"Unknown concept '{who}'; the recorded concepts are: cat, dog"):
        N["AnchorDiffMask"].execute(heat, who, "mean", 0.5)
    assert N["AnchorDiffMask"].execute(heat, "2", "mean", 0.5).args[0].shape == (1, 256, 256)


@pytest.mark.parametrize("line, message", [
    ("²: 10, 10", "unknown concept '²'; the concepts are cat, dog"),
    ("①: 10, 10", "unknown concept '①'; the concepts are cat, dog"),
    ("cat: ², 10", "the point must be two numbers"),
    ("cat: nan, 10", "x and y must be finite numbers"),
    ("cat: 10, inf", "x and y must be finite numbers"),
])
def test_manual_anchors_with_odd_numbers(env, line, message):
    errors, N, _ = env
    with pytest.raises(errors.AnchorDiffError, match=message) as refused:
        N["AnchorDiffAnchorSelect"].execute(_maps(), 1, 8.0, 0.5, line, False)
    assert f"manual anchor '{line}'" in str(refused.value)


# ------------------------------------------------------------------------------ concepts
@pytest.mark.parametrize("concepts, bad", [("cat, (dog:1e308)", "(dog:1e308)"), ("(cat:nan), dog", "(cat:nan)"),
                                           ("cat, (dog:inf)", "(dog:inf)")])
def test_weights_that_cannot_encode_name_the_concept(env, concepts, bad):
    errors, N, clip = env
    with pytest.raises(errors.AnchorDiffError) as refused:
        N["AnchorDiffConcepts"].execute(clip, concepts)
    message = str(refused.value)
    assert message.startswith(f"Concept '{bad}' encodes to NaN or infinite values") and "(cat:1.2)" in message
    assert N["AnchorDiffConcepts"].execute(clip, "cat, (dog:1.2)").args[0].names == ("cat", "(dog:1.2)")


def test_lone_surrogate_in_a_concept(env):
    errors, N, clip = env
    with pytest.raises(ValueError, match=r"Concept 'd\\ud800g' holds a character that is not text"):
        parse_concepts("cat, d\ud800g")
    with pytest.raises(errors.AnchorDiffError, match="retype the concept"):
        N["AnchorDiffConcepts"].execute(clip, "cat, d\ud800g")


def test_unknown_precision_names_the_choices(env, comfy_models_dir):
    from fixtures.tiny_sd3 import VARIANTS, load_with_comfy

    errors, N, clip = env
    model = load_with_comfy(comfy_models_dir / "diffusion_models" / "tiny_sd3.safetensors", expect=VARIANTS["tiny_sd3"])
    concepts = N["AnchorDiffConcepts"].execute(clip, "cat").args[0]
    with pytest.raises(errors.AnchorDiffError,
                       match=r"precision must be one of auto, exact, fast, compact; got 'bogus'. Pick one of them"):
        N["AnchorDiffRecordAttention"].execute(model, concepts, 0.5, -1, "", -1, 2, "bogus")
