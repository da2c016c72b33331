"""The consensus anchor (issue 17): agreement-weighted maps of every block, both directions."""
import numpy as np
import pytest
import torch

import anchordiff_core as ad
from anchordiff_core.anchors import normalize_maps
from reference_numpy import consensus_map as reference_consensus
from test_core_anchors_masks import peaks


def test_consensus_map_and_weights_match_the_loop_reference():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(6, 3, 40, generator=g) ** 3
    maps[2, 1] = 0.0  # an all-zero map: weight 0, contributes nothing
    for power in (1.0, 2.0):
        want_map, want_w = reference_consensus(maps.numpy(), power)
        got_w = ad.agreement_weights(maps, power)
        np.testing.assert_allclose(got_w.numpy(), want_w, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ad.consensus_map(maps, power=power).numpy(), want_map, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(ad.consensus_map(maps[:4], maps[4:], power).numpy(), want_map, rtol=1e-5, atol=1e-9)


def _planted(grid=(10, 10)):
    """Three blocks agree on a broad object around (6, 6); two noisy blocks each put a sharp spike
    somewhere else, (1, 1) and (8, 1), agreeing with nothing. The flat mean's argmax lands on a spike."""
    good = [peaks(grid, [(y, x, 1.0)], 1.5) for y, x in [(6, 6), (6, 7), (7, 6)]]
    bad = [peaks(grid, [(1, 1, 1.0)], 0.2), peaks(grid, [(8, 1, 1.0)], 0.2)]
    return torch.stack(good + bad)[:, None]  # [5, 1, N]


def test_consensus_recovers_where_the_flat_mean_is_pulled_off():
    maps = _planted()
    spikes, centre = {1 * 10 + 1, 8 * 10 + 1}, 6 * 10 + 6
    assert normalize_maps(maps).mean(0).argmax(1).item() in spikes  # the paper's rule fails here
    w = ad.agreement_weights(maps)[:, 0]
    assert bool((w[:3] > 0.1).all()) and bool((w[3:] < w[:3].min() / 100).all())
    assert ad.consensus_anchors(maps).tolist() == [centre]
    # split across the two directions the same way, the answer does not change
    assert ad.consensus_anchors(maps[:2], maps[2:]).tolist() == [centre]


def test_consensus_ties_and_degenerate_inputs():
    same = torch.rand(4, 2, 12)
    same = same[:1].expand(4, 2, 12)
    assert torch.allclose(ad.agreement_weights(same), torch.ones(4, 2))
    assert torch.allclose(ad.consensus_map(same), normalize_maps(same[0]), atol=1e-7)
    # disjoint maps: no agreement anywhere -> equal weights, not NaN
    disjoint = torch.eye(3)[:, None, :]
    assert torch.allclose(ad.consensus_map(disjoint), torch.full((1, 3), 1 / 3))
    with pytest.raises(ValueError, match="two maps"):
        ad.agreement_weights(torch.rand(1, 2, 5))
    with pytest.raises(ValueError, match=r"\[S, K, N\]"):
        ad.agreement_weights(torch.rand(2, 5))


def test_consensus_multi_anchor_uses_select_anchors():
    maps = _planted()
    out = ad.consensus_anchors(maps, max_anchors=2, min_distance=3.0, min_relative_score=0.0, grid=(10, 10))
    assert out.shape == (1, 2) and out[0, 0].item() == 66 and out[0, 1].item() not in (11, 81)


@pytest.mark.parametrize("grid, sigma", [((6, 9), 1.0), ((7, 5), 2.56), ((4, 4), 0.3)])
def test_grid_smoothing_matches_the_loop_reference(grid, sigma):
    """anchors.smooth_on_grid (separable convolution) against the token-pair loop of reference_numpy; the
    grid's rows and columns swapped (a planted bug on a non-square grid) does not match."""
    from anchordiff_core.anchors import smooth_on_grid
    from reference_numpy import grid_smooth

    g = torch.Generator().manual_seed(5)
    maps = torch.rand(3, grid[0] * grid[1], generator=g) ** 2
    want = grid_smooth(maps.numpy(), grid, sigma)
    np.testing.assert_allclose(smooth_on_grid(maps, grid, sigma).numpy(), want, rtol=1e-5, atol=1e-7)
    if grid[0] != grid[1]:
        swapped = smooth_on_grid(maps, grid[::-1], sigma).numpy()
        assert np.abs(swapped - want).max() > 1e-3
    assert torch.equal(smooth_on_grid(maps, grid, 0), maps)
    with pytest.raises(ValueError, match="positive number of tokens"):
        smooth_on_grid(maps, grid, float("nan"))
    with pytest.raises(ValueError, match=r"\[K, N\]"):
        smooth_on_grid(maps, (grid[0] + 1, grid[1]), sigma)


def test_smoothed_consensus_peak_sits_inside_the_agreed_region():
    """The case smoothing is for: the maps agree on a broad object, but its single highest token sits on
    the object's edge; the smoothed peak is inside the object. The sigma follows the grid (8% of its side)."""
    from anchordiff_core.anchors import ANCHOR_SMOOTH_SHARE, anchor_smooth_sigma, smooth_on_grid

    h = w = 20
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    blob = torch.exp(-((yy - 10.0) ** 2 + (xx - 10.0) ** 2) / (2 * 3.0**2)).reshape(-1)
    m = blob.clone()
    edge = 10 * w + 16  # two sigma out on the blob's edge
    m[edge] = 1.5  # one edge token scores highest
    assert int(m.argmax()) == edge
    assert anchor_smooth_sigma((h, w)) == pytest.approx(ANCHOR_SMOOTH_SHARE * 20)
    peak = int(smooth_on_grid(m[None], (h, w), anchor_smooth_sigma((h, w))).argmax())
    py, px = divmod(peak, w)
    assert abs(py - 10) <= 1 and abs(px - 10) <= 1


def test_pipeline_smoothed_consensus_is_the_consensus_map_smoothed():
    """pipeline.anchor_map(..., "consensus_smoothed") = smooth_on_grid of the consensus map, image by image,
    at the grid's sigma; consensus_heat shows the map the chosen anchor is the peak of."""
    from dataclasses import replace

    from anchordiff_core import pipeline
    from anchordiff_core.anchors import anchor_smooth_sigma, smooth_on_grid
    from anchordiff_core.maps import AttentionMaps

    g = torch.Generator().manual_seed(2)
    h, w, blocks = 6, 8, 4
    a_ci = torch.rand(2, blocks, 2, h * w, generator=g) ** 3
    a_ii = torch.rand(2, 1, h * w, h * w, generator=g)
    maps = AttentionMaps(("cat", "dog"), (h, w), (16 * h, 16 * w), a_ci, a_ci.clone(), a_ii, torch.rand(2, 1, h * w, 4, generator=g),
                         (0,), num_blocks=blocks)
    maps = replace(maps, ic=torch.rand(a_ci.shape, generator=g) ** 3)
    plain = pipeline.anchor_map(maps, False, "consensus")
    smoothed = pipeline.anchor_map(maps, False, "consensus_smoothed")
    for b in range(2):
        torch.testing.assert_close(smoothed[b], smooth_on_grid(plain[b], maps.grid, anchor_smooth_sigma(maps.grid)))
    assert not torch.allclose(smoothed, plain)
    heat = pipeline.consensus_heat(maps, "consensus_smoothed")
    assert torch.equal(heat.values.argmax(-1), smoothed.argmax(-1))
    anchors = pipeline.pick_anchors(maps, source="consensus_smoothed")
    assert torch.equal(torch.stack(anchors.indices)[..., 0], smoothed.argmax(-1))
