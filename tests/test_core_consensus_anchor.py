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
