"""The consensus anchor through the nodes on the trained toy SD3 (issue 17): Look At Image's
anchor_maps records every block's image-to-concept map by default and not when the paper's maps are
chosen; Anchor Select's consensus (its default) is the pure function on those maps; the paper's path is
one click away and unchanged."""
import pytest
import torch

from anchordiff_core.anchors import consensus_map

SEED = 1_000_002  # validation scene


@pytest.fixture(scope="module")
def looked(comfy):
    from toyworld import make_scene
    from toyworld.comfy_run import ToyComfy

    torch.set_flush_denormal(True)
    toy = ToyComfy()
    scene = make_scene(SEED, 256)
    names = [c.name for c in scene.concepts]
    cs, latent = toy.concepts(names), toy.latent(scene.image)
    plain = toy.look(scene.image, scene.caption, cs, 0.85, latent=latent, anchor_maps="concept→image (paper)")
    full = toy.look(scene.image, scene.caption, cs, 0.85, latent=latent)  # the default: every block's maps
    assert full.ic is not None
    return toy, plain, full


def select(toy, maps, **kw):
    return toy.run("AnchorDiffAnchorSelect", maps, 1, 8.0, 0.5, "", False, **kw)[0]


def test_per_block_maps_by_default_none_for_the_paper_and_the_rest_unchanged(looked):
    _, plain, full = looked
    assert plain.ic is None
    b, layers, k, n = full.a_ci.shape
    assert full.ic.shape == (b, layers, k, n)
    # the Seg4Diff layer's entry is the Seg4Diff map; other blocks differ from it
    assert torch.allclose(full.ic[:, full.seg4diff_layer], full.seg4diff, atol=1e-6)
    assert (full.ic[:, 0] - full.ic[:, full.seg4diff_layer]).abs().max() > 1e-3
    for name in ("a_ci", "ca_scores", "a_ii", "o_ii", "seg4diff"):
        assert torch.allclose(getattr(full, name).float(), getattr(plain, name).float(), rtol=0, atol=1e-5), name


def test_anchor_select_consensus_is_the_pure_function(looked):
    toy, plain, full = looked
    got = select(toy, full, anchor_from="consensus (blocks agree, both directions)").indices[0][:, 0]
    want = consensus_map(full.a_ci[0, :-1], full.ic[0, :-1], 2.0).argmax(1)
    assert torch.equal(got, want)
    # without the per-block maps: A_CI of every block but the last, plus the Seg4Diff map
    got_plain = select(toy, plain, anchor_from="consensus (blocks agree, both directions)").indices[0][:, 0]
    assert torch.equal(got_plain, consensus_map(plain.a_ci[0, :-1], plain.seg4diff[0][None], 2.0).argmax(1))
    # the smoothed consensus is the default; the unsmoothed consensus (workflows saved with it keep it) and the
    # paper's anchor are one click away and untouched
    from anchordiff_core.anchors import anchor_smooth_sigma, smooth_on_grid
    smoothed = smooth_on_grid(consensus_map(full.a_ci[0, :-1], full.ic[0, :-1], 2.0), full.grid, anchor_smooth_sigma(full.grid)).argmax(1)
    assert torch.equal(select(toy, full).indices[0][:, 0], smoothed)
    assert torch.equal(select(toy, full, anchor_from="consensus, smoothed (region peak)").indices[0][:, 0], smoothed)
    paper = plain.a_ci[0].mean(0).argmax(1)
    assert torch.equal(select(toy, plain, anchor_from="concept→image (paper)").indices[0][:, 0], paper)
    assert torch.equal(select(toy, full, anchor_from="concept→image (paper)").indices[0][:, 0], full.a_ci[0].mean(0).argmax(1))
    assert not torch.equal(got, paper)  # this scene is one where the consensus moves an anchor


def test_bad_choices_are_clear_errors(looked):
    toy, plain, _ = looked
    with pytest.raises(Exception, match="anchor_from must be one of"):
        select(toy, plain, anchor_from="consensus")
    from toyworld import make_scene
    scene = make_scene(SEED, 256)
    with pytest.raises(Exception, match="anchor_maps must be one of"):
        toy.look(scene.image, scene.caption, list(plain.concepts), 0.85, anchor_maps="everything")


def test_the_nodes_default_chain_is_the_pure_functions(looked):
    """Anchor Select and Propagate at their defaults (issue 17, "Anchor regions"): up to 3 peaks of the smoothed
    consensus (>= 0.7 of the peak, 1/8 of the grid side apart), propagated with auto steps, kept only on the mask's
    regions that hold an anchor; 'everywhere (paper)' is the plain propagation of the same anchors."""
    from anchordiff_core import anchor_regions, build_gated_graph, propagate, select_anchors
    from anchordiff_core.anchors import anchor_smooth_sigma, smooth_on_grid
    from anchordiff_core.auto import auto_gate_percentile, auto_steps
    from toyworld import make_scene
    toy = looked[0]
    scene = make_scene(1_000_009, 256)  # a validation look-alike scene where the graph carries heat onto the look-alike
    full = toy.look(scene.image, scene.caption, [c.name for c in scene.concepts], 0.85)
    schema = toy.N["AnchorDiffAnchorSelect"].define_schema()
    defaults = {i.id: getattr(i, "default", None) for i in schema.inputs}
    anchors = toy.run("AnchorDiffAnchorSelect", full, defaults["max_anchors"], defaults["min_distance"],
                      defaults["min_relative_score"], "", False)[0]
    smoothed = smooth_on_grid(consensus_map(full.a_ci[0, :-1], full.ic[0, :-1], 2.0), full.grid, anchor_smooth_sigma(full.grid))
    want_anchors = select_anchors(smoothed, 3, full.grid[0] / 8, 0.7, full.grid)
    assert torch.equal(anchors.indices[0][:, : want_anchors.shape[1]], want_anchors)
    assert (want_anchors >= 0).sum() > len(full.concepts)  # some concept has a second anchor on this scene
    graph = toy.run("AnchorDiffBuildGatedGraph", full, 98.0, "", True)[0]
    heat = toy.run("AnchorDiffPropagate", graph, anchors, 160)[0]  # steps_setting and keep at their defaults
    a_ii, o_ii = full.graph_inputs(0)
    plain = propagate(build_gated_graph(a_ii, o_ii, gate_percentile=auto_gate_percentile(full.grid)), anchors.indices[0], auto_steps(full.grid))
    want = anchor_regions(plain, anchors.indices[0], full.grid)
    torch.testing.assert_close(heat.values[0], want, rtol=0, atol=1e-6)
    assert (heat.values[0] == 0).sum() > (plain == 0).sum()  # regions were cut on this scene
    everywhere = toy.run("AnchorDiffPropagate", graph, anchors, 160, "auto", "everywhere (paper)")[0]
    torch.testing.assert_close(everywhere.values[0], plain, rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="keep must be one of"):
        toy.run("AnchorDiffPropagate", graph, anchors, 160, "auto", "nearby")
    with pytest.raises(Exception, match=r"min_distance must be -1 \(auto\) or a distance in tokens >= 0"):
        toy.run("AnchorDiffAnchorSelect", full, 3, -0.5, 0.7, "", False)
