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
