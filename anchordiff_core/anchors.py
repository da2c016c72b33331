"""Anchors: where propagation starts (paper eq. 7), plus the multi-anchor and manual extensions.

An anchor is a token index on the row-major h x w token grid.  Everything that takes anchors
accepts a LongTensor [K] (one per concept), a LongTensor [K, M] padded with -1 (several per
concept), or a float seed tensor [K, N].
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._checks import as_float_matrix, check_grid

PIXELS_PER_LATENT = 8  # SD3's VAE: one latent per 8 x 8 pixels (the one home of this number)
PATCH_SIZE = 2         # SD3's MM-DiT: one token per 2 x 2 latents
PIXELS_PER_TOKEN = PIXELS_PER_LATENT * PATCH_SIZE  # 16


def select_anchors(
    a_ci: torch.Tensor,
    max_anchors: int = 1,
    min_distance: float = 8.0,
    min_relative_score: float = 0.5,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Anchor token(s) per concept from concept-to-image attention A_CI [K, N].

    max_anchors=1 is the paper: the argmax of each row -> LongTensor [K].  With max_anchors=M > 1,
    greedy non-maximum suppression on the token grid picks up to M peaks per concept, each at least
    `min_distance` tokens (Euclidean) from those already picked and scoring at least
    `min_relative_score` times the concept's maximum -> LongTensor [K, M], padded with -1.
    """
    a_ci = as_float_matrix(a_ci, "a_ci")
    if max_anchors < 1:
        raise ValueError(f"max_anchors must be at least 1; got {max_anchors}")
    if max_anchors == 1:
        return a_ci.argmax(dim=1)
    k, n = a_ci.shape
    if grid is None:
        raise ValueError("multi-anchor selection needs the token grid (h, w) to measure distances")
    h, w = check_grid(n, grid)
    if not 0.0 <= min_distance < math.inf or not 0.0 <= min_relative_score <= 1.0:  # NaN fails both
        raise ValueError(f"min_distance must be a finite number >= 0 and min_relative_score within [0, 1]; "
                         f"got {min_distance!r} and {min_relative_score!r}")
    ys = torch.arange(n, device=a_ci.device) // w
    xs = torch.arange(n, device=a_ci.device) % w
    out = torch.full((k, max_anchors), -1, dtype=torch.long, device=a_ci.device)
    for c in range(k):
        row = a_ci[c]
        floor = row.max() * min_relative_score
        candidates = torch.argsort(row, descending=True, stable=True)
        candidates = candidates[row[candidates] >= floor]
        picked: list[int] = []
        for idx in candidates.tolist():
            if picked:
                p = torch.tensor(picked, device=a_ci.device)
                dist = torch.sqrt(((ys[p] - ys[idx]) ** 2 + (xs[p] - xs[idx]) ** 2).float())
                if bool((dist < min_distance).any()):
                    continue
            picked.append(idx)
            if len(picked) == max_anchors:
                break
        out[c, : len(picked)] = torch.tensor(picked, dtype=torch.long, device=a_ci.device)
    return out


def point_to_token(
    x: float, y: float, image_size: tuple[int, int], grid: tuple[int, int], pixels_per_token: int = PIXELS_PER_TOKEN
) -> int:
    """Token index under pixel (x, y) of an image of size (H, W) whose tokens form grid (h, w).

    The grid may cover a slightly larger (padded) area than the image; it starts at the top-left.
    """
    height, width = image_size
    h, w = grid
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"point ({x}, {y}) lies outside the {width}x{height} image")
    if math.ceil(height / pixels_per_token) != h or math.ceil(width / pixels_per_token) != w:
        raise ValueError(f"image {width}x{height} does not match token grid {w}x{h} at {pixels_per_token} px per token")
    return int(y // pixels_per_token) * w + int(x // pixels_per_token)


def anchor_seeds(anchors: torch.Tensor, num_tokens: int, device=None) -> torch.Tensor:
    """One-hot seeds [K, N] (float32) from anchors in any accepted form; several anchors add up."""
    if not isinstance(anchors, torch.Tensor):
        raise TypeError(f"anchors must be a torch.Tensor; got {type(anchors).__name__}")
    device = anchors.device if device is None else device
    if anchors.is_floating_point():
        if anchors.dim() != 2 or anchors.shape[1] != num_tokens:
            raise ValueError(f"a seed tensor must be [K, {num_tokens}]; got shape {tuple(anchors.shape)}")
        if not torch.isfinite(anchors).all() or bool((anchors < 0).any()) or bool((anchors.sum(1) <= 0).any()):
            raise ValueError("seed rows must be finite, non-negative and not all zero")
        return anchors.to(device=device, dtype=torch.float32)
    if anchors.dim() == 1:
        anchors = anchors[:, None]
    if anchors.dim() != 2:
        raise ValueError(f"anchors must be [K] or [K, M] token indices; got shape {tuple(anchors.shape)}")
    anchors = anchors.to(device=device, dtype=torch.long)
    valid = anchors >= 0
    if bool((anchors >= num_tokens).any()):
        raise ValueError(f"anchor token index out of range for {num_tokens} tokens: {anchors.max().item()}")
    if not bool(valid.any(dim=1).all()):
        raise ValueError("every concept needs at least one anchor (rows of -1 only were given)")
    seeds = torch.zeros(anchors.shape[0], num_tokens, dtype=torch.float32, device=device)
    rows = torch.arange(anchors.shape[0], device=device)[:, None].expand_as(anchors)
    seeds.index_put_((rows[valid], anchors[valid]), torch.ones(int(valid.sum()), device=device), accumulate=True)
    return seeds


# --- Label-free anchor selection beyond the argmax (issue 17) ------------------------------------
#
# The paper's anchor is the argmax of A_CI averaged over every block with equal weight.  When some
# blocks' maps are noise (never-trained text queries of the pre_only block; early or late blocks of
# a small model) the flat mean is dragged off the object.  The "consensus" anchor weights each map
# (every recorded block, both directions: concept-to-image A_CI and image-to-concept, the Seg4Diff
# map of that block) by how well it agrees with the other maps of the same concept, computed from
# the maps alone at run time: no labels, no validation-chosen block.  docs/DESIGN.md "Consensus
# anchor" has the measurements that chose it and the ones that did not win (concentration
# weights, smoothing over the gated graph, mask verification).

ANCHOR_SELECTORS = ("argmax", "consensus")

# Spatial smoothing of an anchor map before its peak is taken (issue 17): a Gaussian over the token
# grid whose sigma is this share of the grid's side (sqrt(rows x columns): 2.56 tokens at 32 x 32,
# 5.1 at 64 x 64, i.e. 82 px at 1024 x 1024). Chosen on the toy's validation split (the best mean
# mask IoU over 256 / 512 px and record_at 0.85 / 0.5 among 0.03-0.125; docs/DESIGN.md "Consensus
# anchor", "Smoothed"): the peak then sits where attention is high over a region, not on one
# token at an object's edge, from which the gated graph's propagation stays small.
ANCHOR_SMOOTH_SHARE = 0.08

# The nodes' multi-anchor defaults, used with Propagate's anchor regions (propagation.anchor_regions): up to
# 3 separated peaks of the concept's map, each at least 0.7 of its maximum, auto.auto_min_distance apart.
# Chosen on the toy's validation split at 256 / 512 px and record_at 0.85 / 0.5 (docs/DESIGN.md,
# "Anchor regions"): a phrase's second instance keeps its own region, a look-alike's region (no anchor) is cut.
REGION_MAX_ANCHORS = 3
REGION_MIN_RELATIVE_SCORE = 0.7


def anchor_smooth_sigma(grid: tuple[int, int], share: float = ANCHOR_SMOOTH_SHARE) -> float:
    """The smoothing sigma in tokens for a token grid: `share` of sqrt(rows x columns)."""
    h, w = grid
    return share * math.sqrt(h * w)


def gaussian_taps(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian of standard deviation `sigma` (tokens), radius ceil(4 sigma): [2r + 1] float32."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number of tokens; got {sigma}")
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).float()


def smooth_on_grid(maps: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Each map [K, N] (tokens row-major on `grid`) blurred by a Gaussian of `sigma` tokens, rows then
    columns (separable), zero outside the grid: [K, N] float32. sigma 0 returns the maps unchanged."""
    h, w = grid
    if maps.dim() != 2 or maps.shape[1] != h * w:
        raise ValueError(f"maps must be [K, N] with N = {h} x {w} tokens; got {tuple(maps.shape)}")
    x = maps.float()
    if sigma == 0:
        return x
    taps = gaussian_taps(sigma).to(x.device)
    r = (taps.numel() - 1) // 2
    img = x.view(-1, 1, h, w)
    img = torch.nn.functional.conv2d(img, taps.view(1, 1, -1, 1), padding=(r, 0))
    img = torch.nn.functional.conv2d(img, taps.view(1, 1, 1, -1), padding=(0, r))
    return img.reshape(maps.shape[0], h * w)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map [..., N] (negatives clamped to 0) divided by its sum: a distribution over tokens;
    an all-zero map stays zero."""
    if not isinstance(maps, torch.Tensor) or maps.dim() < 1:
        raise TypeError("maps must be a tensor [..., N]")
    p = maps.float().clamp_min(0)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)


def agreement_weights(maps: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Label-free reliability of each of S maps per concept: maps [S, K, N] -> weights [S, K].

    Map s's weight for concept k is the cosine similarity (clamped at 0) between its normalised map
    and the mean of the other S - 1 normalised maps of that concept (leave-one-out), raised to
    `power`.  A map that points where the others point is trusted; one that points elsewhere (noise,
    a wrong object) is down-weighted.  Needs S >= 2."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3:
        raise ValueError(f"maps must be [S, K, N]; got {getattr(maps, 'shape', type(maps))}")
    s = maps.shape[0]
    if s < 2:
        raise ValueError("agreement needs at least two maps per concept")
    if not power >= 0:
        raise ValueError(f"power must be >= 0; got {power}")
    p = normalize_maps(maps)
    others = (p.sum(0, keepdim=True) - p) / (s - 1)
    cos = torch.nn.functional.cosine_similarity(p, others, dim=-1, eps=1e-30)
    return cos.clamp_min(0) ** power


def weighted_map(maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_s w[s, k] p[s, k] / sum_s w[s, k] over normalised maps [S, K, N] -> [K, N]; a concept whose
    weights are all zero falls back to equal weights."""
    p = normalize_maps(maps)
    if weights.shape != maps.shape[:2]:
        raise ValueError(f"weights must be [S, K] = {tuple(maps.shape[:2])}; got {tuple(weights.shape)}")
    w = weights.to(p)
    w = torch.where(w.sum(0, keepdim=True) > 0, w, torch.ones_like(w))
    return (w[..., None] * p).sum(0) / w.sum(0)[..., None]


def consensus_map(a_ci: torch.Tensor, ic: Optional[torch.Tensor] = None, power: float = 1.0) -> torch.Tensor:
    """The consensus anchor map [K, N] from per-block A_CI [L, K, N] and, when recorded, per-block
    image-to-concept maps [L', K, N]: all maps pooled, weighted by `agreement_weights`."""
    stack = a_ci if ic is None else torch.cat([a_ci.float(), ic.float().to(a_ci.device)], 0)
    return weighted_map(stack, agreement_weights(stack, power))


def consensus_anchors(a_ci: torch.Tensor, ic: Optional[torch.Tensor] = None, power: float = 1.0, **select) -> torch.Tensor:
    """Anchors (as `select_anchors`: [K], or [K, M] with max_anchors > 1) at the consensus map's peaks."""
    return select_anchors(consensus_map(a_ci, ic, power), **select)
