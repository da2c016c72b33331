"""Heat maps on the token grid -> image-sized soft maps and binary masks."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._checks import as_float_matrix, check_grid

Threshold = Union[str, float]


def soft_map(heat: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], crop: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """[K, N] heat -> [K, H, W] float32: row-major h x w grid, bilinear (align_corners=False).

    `crop=(H', W')` keeps the top-left H' x W' after resizing: the token grid of an image whose
    latent was padded to even size covers a little more than the image itself.
    """
    heat = as_float_matrix(heat, "heat")
    h, w = check_grid(heat.shape[1], grid)
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive; got {size}")
    maps = F.interpolate(heat.view(-1, 1, h, w), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    if crop is not None:
        ch, cw = (int(v) for v in crop)
        if not (0 < ch <= height and 0 < cw <= width):
            raise ValueError(f"crop {crop} must lie within size {size}")
        maps = maps[:, :ch, :cw]
    return maps.contiguous()


def otsu_thresholds(maps: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Per-map Otsu threshold [K] (maximal between-class variance) over a histogram on [min, max]."""
    flat = maps.reshape(maps.shape[0], -1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for i, values in enumerate(flat):
        lo, hi = values.min(), values.max()
        if hi <= lo:
            out[i] = hi
            continue
        hist = torch.histc(values, bins=bins, min=lo.item(), max=hi.item())
        centers = lo + (torch.arange(bins, device=flat.device, dtype=torch.float32) + 0.5) * (hi - lo) / bins
        weight_bg = hist.cumsum(0)
        weight_fg = hist.sum() - weight_bg
        mass_bg = (hist * centers).cumsum(0)
        mean_bg = mass_bg / weight_bg.clamp_min(1)
        mean_fg = (mass_bg[-1] - mass_bg) / weight_fg.clamp_min(1)
        between = weight_bg * weight_fg * (mean_bg - mean_fg) ** 2
        best = int(torch.argmax(between[:-1]))
        out[i] = lo + (best + 1) * (hi - lo) / bins  # upper edge of the last background bin
    return out


def thresholds_for(maps: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """Per-map threshold [K]: "mean" (paper), "otsu", or a fixed number."""
    if isinstance(threshold, str):
        if threshold == "mean":
            return maps.reshape(maps.shape[0], -1).mean(dim=1)
        if threshold == "otsu":
            return otsu_thresholds(maps)
        raise ValueError(f"threshold must be 'mean', 'otsu' or a number; got {threshold!r}")
    return torch.full((maps.shape[0],), float(threshold), dtype=torch.float32, device=maps.device)


def to_mask(
    heat: torch.Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
    threshold: Threshold = "mean",
    crop: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Binary masks [K, H, W] (float32 0/1): resized heat strictly greater than its threshold."""
    maps = soft_map(heat, grid, size, crop)
    return (maps > thresholds_for(maps, threshold).view(-1, 1, 1)).float()
