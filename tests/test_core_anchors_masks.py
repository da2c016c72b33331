"""Anchor selection (paper, multi-anchor, manual) and heat -> mask conversion."""
import pytest
import torch
import torch.nn.functional as F

import anchordiff_core as ad


def test_default_anchor_is_the_argmax_per_concept():
    a_ci = torch.tensor([[0.1, 0.7, 0.2, 0.0], [0.5, 0.1, 0.1, 0.3]])
    anchors = ad.select_anchors(a_ci)
    assert anchors.dtype == torch.long and anchors.tolist() == [1, 0]


def test_argmax_tie_takes_the_first_token():
    assert ad.select_anchors(torch.tensor([[0.2, 0.4, 0.4]])).tolist() == [1]


def peaks(grid, points, sigma=1.0):
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    out = torch.zeros(h, w)
    for (y, x, amp) in points:
        out += amp * torch.exp(-((ys - y) ** 2 + (xs - x) ** 2) / (2 * sigma**2))
    return out.flatten()


def test_multi_anchor_finds_separated_instances():
    grid = (12, 16)
    a_ci = torch.stack([peaks(grid, [(2, 2, 1.0), (9, 13, 0.8), (2, 5, 0.9)], 0.7), peaks(grid, [(6, 6, 1.0)], 0.7)])
    anchors = ad.select_anchors(a_ci, max_anchors=3, min_distance=4, min_relative_score=0.5, grid=grid)
    assert anchors.shape == (2, 3)
    # concept 0: both instances; the second-highest peak, (2, 5), is within min_distance of (2, 2)
    assert anchors[0].tolist() == [2 * 16 + 2, 9 * 16 + 13, -1]
    # concept 1: one peak; its own shoulder is within min_distance, nothing else reaches the floor
    assert anchors[1].tolist() == [6 * 16 + 6, -1, -1]


def test_multi_anchor_score_floor():
    grid = (8, 8)
    a_ci = peaks(grid, [(1, 1, 1.0), (6, 6, 0.3)])[None]
    assert ad.select_anchors(a_ci, 2, 3, 0.5, grid)[0].tolist() == [9, -1]
    assert ad.select_anchors(a_ci, 2, 3, 0.2, grid)[0].tolist() == [9, 54]


def test_multi_anchor_needs_grid():
    with pytest.raises(ValueError, match="grid"):
        ad.select_anchors(torch.rand(1, 16), max_anchors=2)
    with pytest.raises(ValueError, match="does not match"):
        ad.select_anchors(torch.rand(1, 16), max_anchors=2, grid=(3, 5))


def test_point_to_token_maps_pixels_to_the_token_grid():
    # 1024 x 768 image (H=768, W=1024) -> 48 x 64 tokens of 16 px
    assert ad.point_to_token(0, 0, (768, 1024), (48, 64)) == 0
    assert ad.point_to_token(1023, 767, (768, 1024), (48, 64)) == 48 * 64 - 1
    assert ad.point_to_token(33, 17, (768, 1024), (48, 64)) == 1 * 64 + 2
    # odd latent: 1032 px high -> 129 latent rows -> padded to 130 -> 65 token rows
    assert ad.point_to_token(5, 1031, (1032, 512), (65, 32)) == 64 * 32 + 0
    with pytest.raises(ValueError, match="outside"):
        ad.point_to_token(1024, 0, (768, 1024), (48, 64))
    with pytest.raises(ValueError, match="does not match"):
        ad.point_to_token(0, 0, (768, 1024), (64, 64))


def test_anchor_seeds_forms():
    seeds = ad.anchor_seeds(torch.tensor([[1, 3], [0, -1]]), 5)
    assert seeds.tolist() == [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]]
    assert ad.anchor_seeds(torch.tensor([2]), 3).tolist() == [[0, 0, 1]]
    with pytest.raises(ValueError, match="non-negative"):
        ad.anchor_seeds(torch.tensor([[0.0, -1.0, 2.0]]), 3)


# ------------------------------------------------------------------ masks
def test_soft_map_is_bilinear_without_align_corners():
    heat = torch.tensor([[0.0, 1.0, 0.5, 0.25, 1.0, 0.0]])  # grid 2 x 3
    soft = ad.soft_map(heat, (2, 3), (4, 6))
    expected = F.interpolate(heat.view(1, 1, 2, 3), size=(4, 6), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(soft, expected)
    # hand check of one value: output pixel (0, 1) samples input x = (1 + 0.5) / 2 - 0.5 = 0.25 on row 0
    assert soft[0, 0, 1].item() == pytest.approx(0.25)


def test_to_mask_thresholds_strictly_above_the_mean():
    heat = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # mean of the resized map is exactly 0.5
    mask = ad.to_mask(heat, (2, 2), (2, 2))
    assert mask.dtype == torch.float32 and mask.tolist() == [[[0.0, 0.0], [1.0, 1.0]]]
    half = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    assert ad.to_mask(half, (2, 2), (2, 2)).sum() == 0  # nothing is strictly above a constant


def test_to_mask_fixed_and_otsu_thresholds():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 300, generator=g) * 0.2
    high = 0.7 + torch.rand(1, 100, generator=g) * 0.3
    heat = torch.cat([low, high], 1)  # 400 tokens, grid 20 x 20, bimodal
    mask = ad.to_mask(heat, (20, 20), (20, 20), threshold="otsu")
    assert mask.sum() == 100  # Otsu falls in the gap between the modes
    thr = ad.otsu_thresholds(heat.view(1, 20, 20))
    assert 0.2 <= thr.item() <= 0.7
    assert ad.to_mask(heat, (20, 20), (20, 20), threshold=0.9).sum() == (heat > 0.9).sum()
    with pytest.raises(ValueError, match="threshold"):
        ad.to_mask(heat, (20, 20), (20, 20), threshold="median")


def test_to_mask_crop_removes_padding_before_thresholding():
    heat = torch.zeros(1, 6)
    heat[0, 5] = 1.0  # bottom-right token of a 2 x 3 grid
    full = ad.soft_map(heat, (2, 3), (32, 48))
    cropped = ad.to_mask(heat, (2, 3), (32, 48), crop=(30, 44))
    assert cropped.shape == (1, 30, 44)
    expected = (full[:, :30, :44] > full[:, :30, :44].mean()).float()
    torch.testing.assert_close(cropped, expected)


def test_mask_shapes_and_errors():
    heat = torch.rand(3, 12)
    assert ad.to_mask(heat, (3, 4), (48, 64)).shape == (3, 48, 64)
    with pytest.raises(ValueError, match="does not match 12 tokens"):
        ad.to_mask(heat, (4, 4), (48, 64))
    with pytest.raises(ValueError, match="crop"):
        ad.to_mask(heat, (3, 4), (48, 64), crop=(49, 64))


# ------------------------------------------------------------------ baselines
def test_cross_attention_heat_averages_layers_then_minmax():
    layers = torch.tensor([[[0.0, 2.0, 4.0]], [[4.0, 2.0, 0.0]], [[1.0, 1.0, 4.0]]])  # L=3, K=1, N=3
    torch.testing.assert_close(ad.cross_attention_heat(layers), torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(ad.cross_attention_heat(layers, [0]), torch.tensor([[0.0, 0.5, 1.0]]))


def test_concept_attention_scores_and_softmax_over_concepts():
    image_out = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # B=1, N=3, D=2
    concept_out = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]]])  # 3 tokens
    scores = ad.concept_attention_scores(image_out, concept_out, torch.tensor([0, 1, 1]), 2)
    # concept 0 -> direction (1, 0); concept 1 -> mean (0, 2) -> (0, 1)
    torch.testing.assert_close(scores, torch.tensor([[[1.0, 0.0, 1.0], [0.0, 2.0, 1.0]]]))
    heat = ad.concept_attention_heat(scores)  # scores as a single layer [L=1, K=2, N=3]
    soft = torch.softmax(scores[0], dim=0)
    torch.testing.assert_close(heat, ad.minmax_rows(soft))
    # a single concept: softmax is constant -> all zeros; without softmax the map survives
    single = scores[:, :1]
    assert ad.concept_attention_heat(single).abs().sum() == 0
    torch.testing.assert_close(ad.concept_attention_heat(single, softmax=False), torch.tensor([[1.0, 0.0, 1.0]]))


def test_seg4diff_heat_is_minmax_of_expert_map():
    torch.testing.assert_close(ad.seg4diff_heat(torch.tensor([[1.0, 3.0, 2.0]])), torch.tensor([[0.0, 1.0, 0.5]]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_core_refuses_non_finite_numbers(bad):
    """NaN compares false with every bound, so each range check must be written to fail on it."""
    a_ci = torch.rand(2, 16)
    with pytest.raises(ValueError, match="min_distance must be a finite number"):
        ad.select_anchors(a_ci, 2, bad, 0.5, (4, 4))
    with pytest.raises(ValueError, match="min_relative_score within"):
        ad.select_anchors(a_ci, 2, 1.0, bad, (4, 4))
    with pytest.raises(ValueError, match="finite number"):
        ad.to_mask(a_ci, (4, 4), (64, 64), bad)
