"""Anchors: where propagation starts (paper eq. 7), plus the multi-anchor and manual extensions.

An anchor is a token index on the row-major h x w token grid.  Everything that takes anchors
accepts a LongTensor [K] (one per concept), a LongTensor [K, M] padded with -1 (several per
concept), or a float seed tensor [K, N].
"""
from __future__ import annotations

import math

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
