"""Edge-aware masks (image-guided refinement of the heat) and the boundary F-score."""
import json

import numpy as np
import pytest
import torch

from anchordiff_core.masks import box_mean, guided_filter, refine_edges, refined_soft_map, soft_map
from anchordiff_core.metrics import BinarySegmentationMeter, boundary_f_score, mask_boundary, mean_threshold


# ----------------------------------------------------------------------------- guided filter
def brute_box_mean(x, r):
    h, w = x.shape[-2:]
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            out[..., i, j] = x[..., max(0, i - r): i + r + 1, max(0, j - r): j + r + 1].mean(axis=(-2, -1))
    return out


def brute_guided_filter(p, guide, r, eps):
    """He et al.'s definition, window by window: ridge fit of p on the guide's colour in each window
    (population covariance), then a, b averaged over the windows covering each pixel."""
    c, h, w = guide.shape
    a = np.zeros((c, h, w))
    b = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            win = (slice(max(0, i - r), i + r + 1), slice(max(0, j - r), j + r + 1))
            gi = guide[(slice(None),) + win].reshape(c, -1)
            pi = p[win].reshape(-1)
            mu, pm = gi.mean(1), pi.mean()
            cov = (gi - mu[:, None]) @ (gi - mu[:, None]).T / gi.shape[1]
            cross = (gi - mu[:, None]) @ (pi - pm) / gi.shape[1]
            a[:, i, j] = np.linalg.solve(cov + eps * np.eye(c), cross)
            b[i, j] = pm - a[:, i, j] @ mu
    return (brute_box_mean(a, r) * guide).sum(0) + brute_box_mean(b, r)


def test_box_mean_clips_the_window_at_the_border():
    x = torch.rand(2, 7, 9, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(box_mean(x, 2).numpy(), brute_box_mean(x.numpy(), 2), atol=1e-6)
    assert torch.equal(box_mean(x, 0), x)


@pytest.mark.parametrize("channels", [3, 1])
def test_guided_filter_matches_the_windowed_definition(channels):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(9, 11, channels, generator=g)
    maps = torch.rand(2, 9, 11, generator=g)
    out = guided_filter(maps, image, radius=2, eps=1e-2)
    guide = image.permute(2, 0, 1).double().numpy()
    for k in range(2):
        np.testing.assert_allclose(out[k].numpy(), brute_guided_filter(maps[k].double().numpy(), guide, 2, 1e-2), atol=1e-4)


def test_guided_filter_with_a_flat_image_is_a_double_box_blur():
    maps = torch.rand(1, 12, 12, generator=torch.Generator().manual_seed(2))
    flat = torch.full((12, 12, 3), 0.4)
    torch.testing.assert_close(guided_filter(maps, flat, 2, 1e-3), box_mean(box_mean(maps, 2), 2), atol=1e-5, rtol=0)


def test_guided_filter_accepts_uint8_and_channels_first():
    g = torch.Generator().manual_seed(3)
    image = (torch.rand(10, 8, 3, generator=g) * 255).round().to(torch.uint8)
    maps = torch.rand(2, 10, 8, generator=g)
    a = guided_filter(maps, image, 2)
    b = guided_filter(maps, image.permute(2, 0, 1).float() / 255, 2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_guided_filter_errors():
    maps = torch.rand(1, 8, 8)
    with pytest.raises(ValueError, match="does not fit maps of 8 x 8"):
        guided_filter(maps, torch.rand(16, 16, 3))
    with pytest.raises(ValueError, match=r"\[K, H, W\]"):
        guided_filter(maps[0], torch.rand(8, 8, 3))
    with pytest.raises(ValueError, match="eps > 0"):
        guided_filter(maps, torch.rand(8, 8, 3), eps=0)
    with pytest.raises(ValueError, match="NaN"):
        guided_filter(maps, torch.full((8, 8, 3), float("nan")))


# ----------------------------------------------------------------------------- the point: real edges
def disc_scene(size=128, tokens=8, centre=(60.0, 70.0), radius=37.0, seed=0):
    """A disc on a background of another colour (with noise), and the token-level heat a method
    would give at best: each token's coverage by the disc, upsampled bilinearly (16 px blocks)."""
    ys, xs = torch.meshgrid(torch.arange(size).float() + 0.5, torch.arange(size).float() + 0.5, indexing="ij")
    truth = (ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 < radius**2
    image = torch.where(truth[..., None], torch.tensor([0.8, 0.35, 0.2]), torch.tensor([0.25, 0.5, 0.7]))
    image = (image + 0.05 * torch.randn(size, size, 3, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    block = size // tokens
    cover = truth.float().view(tokens, block, tokens, block).mean((1, 3)).flatten()[None]
    return image, soft_map(cover, (tokens, tokens), (size, size)), truth


def test_refinement_moves_the_mask_onto_the_object_edge():
    image, soft, truth = disc_scene()
    refined = refine_edges(soft, image)
    assert refined.min() >= 0 and refined.max() <= 1
    plain, edged = mean_threshold(soft[0].numpy()), mean_threshold(refined[0].numpy())
    bf_plain, bf_edged = boundary_f_score(plain, truth.numpy())["bf"], boundary_f_score(edged, truth.numpy())["bf"]
    iou = lambda m: (m & truth.numpy()).sum() / (m | truth.numpy()).sum()
    assert bf_plain < 0.5 and bf_edged > 0.95, (bf_plain, bf_edged)
    assert iou(edged) > iou(plain) + 0.1 and iou(edged) > 0.97


def test_refinement_does_not_invent_edges_where_the_image_has_none():
    """A flat image gives the refinement nothing to follow: the mask stays where the heat put it."""
    _, soft, truth = disc_scene()
    flat = torch.full((128, 128, 3), 0.5)
    refined = refine_edges(soft, flat)
    assert boundary_f_score(mean_threshold(refined[0].numpy()), truth.numpy())["bf"] < 0.5


def test_refined_soft_map_normalises_each_row_before_refining():
    """Heat in any range refines as its min-max normalised self would (the guided filter is not
    scale-free: eps is for maps in 0..1), a constant row stays zero, and pixel maps pass at their
    own size unchanged by the resize."""
    image, soft, _ = disc_scene()
    rows = soft.reshape(1, -1)
    expected = refine_edges(soft, image)
    scaled = torch.cat([rows * 37.0 - 5.0, torch.full_like(rows, 3.0)])
    got = refined_soft_map(scaled.double(), (128, 128), (128, 128), image)
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=0)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert not torch.allclose(refine_edges(soft * 37.0 - 5.0, image)[0], expected[0], atol=1e-3)   # the step matters


# ----------------------------------------------------------------------------- boundary F-score
def test_mask_boundary_is_the_inner_outline_and_not_the_image_border():
    m = np.zeros((6, 7), bool)
    m[1:5, 2:6] = True
    b = mask_boundary(m)
    assert b.sum() == 4 * 4 - 2 * 2 and not b[2:4, 3:5].any()
    assert not mask_boundary(np.ones((5, 5), bool)).any()
    edge = np.zeros((5, 5), bool)
    edge[:, :2] = True  # touches three image borders: only the column next to the background is boundary
    assert mask_boundary(edge).nonzero()[1].tolist() == [1] * 5


def test_boundary_f_by_hand():
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True
    assert boundary_f_score(gt, gt, 0)["bf"] == 1.0
    shifted = np.roll(gt, 2, axis=1)
    r0, r2 = boundary_f_score(shifted, gt, 0), boundary_f_score(shifted, gt, 2)
    # tolerance 0: only the 2 x 8 + ... pixels of the top and bottom rows that overlap agree
    assert r0["bf_precision"] == pytest.approx(16 / 36) and r0["bf_recall"] == pytest.approx(16 / 36)
    assert r2["bf"] == 1.0
    assert boundary_f_score(shifted, gt, 1)["bf"] < 1.0


def test_boundary_f_empty_cases_and_default_tolerance():
    empty, full = np.zeros((10, 10), bool), np.ones((10, 10), bool)
    some = np.zeros((10, 10), bool)
    some[2:5, 2:5] = True
    assert boundary_f_score(empty, empty)["bf"] == 1.0
    assert boundary_f_score(full, empty)["bf"] == 1.0  # neither has an edge inside the image
    assert boundary_f_score(some, empty) == {"bf": 0.0, "bf_precision": 0.0, "bf_recall": 1.0, "tolerance": 1}
    assert boundary_f_score(empty, some)["bf_recall"] == 0.0
    assert boundary_f_score(np.zeros((1024, 1024), bool), np.zeros((1024, 1024), bool))["tolerance"] == 12
    assert boundary_f_score(some, some, None)["tolerance"] == 1  # ceil(0.008 * 14.1)
    with pytest.raises(ValueError, match="same 2-D shape"):
        boundary_f_score(some, some[:5])


def test_meter_reports_bf_and_scores_only_valid_pixels():
    heat = np.array([[0.9, 0.8, 0.1, 0.0], [0.7, 0.9, 0.2, 0.1], [0.1, 0.0, 0.0, 0.2], [0.0, 0.1, 0.1, 0.0]])
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    valid = np.ones((4, 4), bool)
    m = BinarySegmentationMeter(boundary_tolerance=0)
    per = m.update(heat, gt)
    assert per["acc"] == 1.0 and per["bf"] == 1.0
    wrong = np.array(gt)
    wrong[3, 3] = True  # a false truth pixel...
    valid[3, 3] = False  # ...that is void: not scored for acc / IoU / AP
    per = m.update(heat, wrong, valid)
    assert per["acc"] == 1.0 and per["iou_fg"] == 1.0 and per["ap"] == 1.0
    assert per["bf"] < 1.0  # boundaries compare whole masks
    r = m.compute()
    assert r["n_images"] == 2 and r["bf"] == pytest.approx((1.0 + per["bf"]) / 2)
    with pytest.raises(ValueError, match="no valid pixel"):
        m.update(heat, gt, np.zeros((4, 4), bool))


# ----------------------------------------------------------------------------- the measuring command
def test_evaluate_edges_reports_with_and_without(tmp_path, capsys):
    from anchordiff_core.evaluate import main

    for seed, centre in enumerate([(60.0, 70.0), (50.0, 45.0)]):
        image, soft, truth = disc_scene(centre=centre, seed=seed)
        np.savez(tmp_path / f"s{seed}.npz", heat=soft.numpy(), gt=truth[None].numpy(),
                 image=(image.numpy() * 255).round().astype(np.uint8))
    assert main([str(tmp_path), "--edges", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    plain, edged = res["binary"], res["edges"]["binary"]
    assert res["edges"]["radius"] == 16 and plain["n_images"] == edged["n_images"] == 2
    assert edged["bf"] > 0.85 and plain["bf"] < 0.1
    assert edged["miou"] > plain["miou"] + 0.05
    # the same from memory (what a benchmark calls)
    from anchordiff_core.evaluate import evaluate_maps

    items = []
    for seed, centre in enumerate([(60.0, 70.0), (50.0, 45.0)]):
        image, soft, truth = disc_scene(centre=centre, seed=seed)
        items.append((f"s{seed}", soft.numpy(), truth[None].numpy(), (image.numpy() * 255).round().astype(np.uint8)))
    in_memory = evaluate_maps(items, edges=True)
    assert in_memory["edges"]["binary"] == pytest.approx(res["edges"]["binary"])
    assert in_memory["binary"] == pytest.approx(res["binary"])
    assert main([str(tmp_path), "--edges"]) == 0
    table = capsys.readouterr().out
    assert "heat (as given)" in table and "edges r=16 eps=0.001" in table and "BF" in table


def test_evaluate_edges_needs_the_image(tmp_path, capsys):
    from anchordiff_core.evaluate import main

    np.savez(tmp_path / "a.npz", heat=np.random.rand(8, 8), gt=np.eye(8, dtype=bool))
    assert main([str(tmp_path), "--edges"]) == 2
    assert "--edges needs each file's image" in capsys.readouterr().err
