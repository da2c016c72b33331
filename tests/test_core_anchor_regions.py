"""Anchor regions (issue 17): the propagated heat kept only on the mask's regions that hold an anchor,
against OpenCV's connected components as the independent reference."""
import cv2
import numpy as np
import pytest
import torch

import anchordiff_core as ad
from anchordiff_core.auto import auto_min_distance, min_distance_for


def reference_regions(heat: np.ndarray, anchors, grid, connectivity=8) -> np.ndarray:
    """Per concept: label the mask (heat > mean) with cv2.connectedComponents, keep the labels of the
    anchors' tokens, zero the heat elsewhere; unchanged when no anchor is in the mask."""
    h, w = grid
    out = heat.copy()
    for k, row in enumerate(heat):
        on = (row > row.mean()).reshape(h, w).astype(np.uint8)
        _, labels = cv2.connectedComponents(on, connectivity=connectivity)
        labels = labels.reshape(-1)
        held = {int(labels[a]) for a in np.atleast_1d(anchors[k]) if a >= 0} - {0}
        if held:
            out[k] = np.where(np.isin(labels, list(held)), row, 0.0)
    return out


def _blobs(grid, centres, radius):
    h, w = grid
    ys, xs = np.mgrid[0:h, 0:w]
    return np.maximum.reduce([np.exp(-((ys - y) ** 2 + (xs - x) ** 2) / (2 * radius ** 2)) * v for y, x, v in centres]).reshape(-1)


def test_matches_connected_components_on_random_and_structured_heat():
    rng = np.random.default_rng(0)
    for grid in [(12, 12), (9, 17), (32, 20)]:
        n = grid[0] * grid[1]
        heat = np.stack([
            _blobs(grid, [(2, 2, 1.0), (grid[0] - 3, grid[1] - 3, 0.9)], 1.5),    # two separate objects
            rng.random(n) ** 4,                                                    # speckle: many small regions
            _blobs(grid, [(grid[0] // 2, grid[1] // 2, 1.0)], 3.0),                # one region
        ]).astype(np.float32)
        for anchors in (np.array([0, 5, n // 2]), np.array([[2 * grid[1] + 2, -1], [7, n - 1], [n // 2, 0]])):
            for connectivity in (8, 4):
                want = reference_regions(heat, anchors, grid, connectivity)
                got = ad.anchor_regions(torch.from_numpy(heat), torch.from_numpy(anchors), grid, connectivity)
                np.testing.assert_array_equal(got.numpy(), want)


def test_a_separate_look_alike_is_cut_and_a_second_anchor_keeps_its_instance():
    grid = (16, 16)
    heat = torch.from_numpy(_blobs(grid, [(4, 4, 1.0), (11, 11, 0.8)], 1.2)).float()[None]
    target = 4 * 16 + 4
    one = ad.anchor_regions(heat, torch.tensor([target]), grid)
    assert one[0, 11 * 16 + 11] == 0 and one[0, target] == heat[0, target]
    both = ad.anchor_regions(heat, torch.tensor([[target, 11 * 16 + 11]]), grid)
    assert torch.equal(both, torch.where(heat > heat.mean(), heat, torch.zeros_like(heat)))  # both regions, nothing else


def test_diagonal_neighbours_are_one_region():
    """8-connectivity: a diagonal staircase is one region (planted 4-connectivity cuts it)."""
    grid = (6, 6)
    heat = torch.zeros(1, 36)
    for i in range(6):
        heat[0, i * 6 + i] = 1.0
    got = ad.anchor_regions(heat, torch.tensor([0]), grid)
    assert torch.equal(got, heat)
    four = ad.anchor_regions(heat, torch.tensor([0]), grid, connectivity=4)  # the default planted as 4
    assert torch.equal(four, torch.where(torch.arange(36) == 0, heat, torch.zeros_like(heat)))
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        ad.anchor_regions(heat, torch.tensor([0]), grid, connectivity=6)


def test_no_anchor_in_the_mask_leaves_the_heat_and_bad_anchors_are_refused():
    heat = torch.ones(2, 16)
    assert torch.equal(ad.anchor_regions(heat, torch.tensor([3, 5]), (4, 4)), heat)  # constant: empty mask
    with pytest.raises(ValueError, match="anchor indices must be tokens 0..15"):
        ad.anchor_regions(heat, torch.tensor([3, 16]), (4, 4))
    with pytest.raises(ValueError, match="does not match 16 tokens"):
        ad.anchor_regions(heat, torch.tensor([3, 5]), (3, 4))


def test_auto_min_distance_is_an_eighth_of_the_grid_side():
    assert auto_min_distance((64, 64)) == 8.0 and auto_min_distance((32, 32)) == 4.0 and auto_min_distance((16, 16)) == 2.0
    assert min_distance_for("auto", (32, 32)) == 4.0 and min_distance_for(3, (32, 32)) == 3.0
    for bad in ("far", -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="min_distance must be 'auto' or a number of tokens >= 0"):
            min_distance_for(bad, (8, 8))
