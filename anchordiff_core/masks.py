"""Heat maps on the token grid -> image-sized soft maps and binary masks."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._checks import as_float_matrix, check_grid
from .anchors import PIXELS_PER_TOKEN
from .propagation import minmax_rows

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
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be 'mean', 'otsu' or a finite number (heat is in 0..1); got {threshold!r}")
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


# ------------------------------------------------------------------------------ edge refinement
EDGE_RADIUS = PIXELS_PER_TOKEN  # pixels: one token (SD3: 8 px per latent x 2 per patch = 16)
EDGE_EPS = 1e-3  # guided-filter regularisation for a guide in 0..1 (smaller follows weaker edges)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1) x (2r+1) window around each pixel of [..., H, W], the window clipped at
    the image border (each border pixel averages only the pixels that exist). Separable, O(1) per pixel."""
    if radius <= 0:
        return x
    return _box_mean_1d(_box_mean_1d(x, radius, -2), radius, -1).to(x.dtype)


def _box_mean_1d(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Clipped window mean along one axis from a running sum (float64: exact enough at any size), O(1) per pixel."""
    n = x.shape[dim]
    zero = torch.zeros_like(x.narrow(dim, 0, 1), dtype=torch.float64)
    run = torch.cat([zero, x.double().cumsum(dim)], dim)
    idx = torch.arange(n, device=x.device)
    hi, lo = (idx + radius + 1).clamp(max=n), (idx - radius).clamp(min=0)
    shape = [1] * x.dim()
    shape[dim] = n
    return (run.index_select(dim, hi) - run.index_select(dim, lo)) / (hi - lo).view(shape).double()


def _as_guide(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The image the maps belong to, [H, W, C] (ComfyUI IMAGE layout) or [C, H, W] or [H, W]; floats in
    0..1 or uint8; C = 1, 3 or 4 (alpha dropped) -> [C', H, W] float32 in 0..1."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor; got {type(image).__name__}")
    size = tuple(int(v) for v in size)
    if image.dim() == 2 and tuple(image.shape) == size:
        image = image[None]
    elif image.dim() == 3 and tuple(image.shape[:2]) == size and image.shape[2] in (1, 3, 4):
        image = image.permute(2, 0, 1)
    elif not (image.dim() == 3 and tuple(image.shape[1:]) == size and image.shape[0] in (1, 3, 4)):
        raise ValueError(
            f"image of shape {tuple(image.shape)} does not fit maps of {size[0]} x {size[1]} pixels: "
            "pass the image the maps belong to, [H, W, C] or [C, H, W] at the maps' size"
        )
    guide = image[:3].float() / (255.0 if image.dtype == torch.uint8 else 1.0)
    if not bool(torch.isfinite(guide).all()):
        raise ValueError("image contains NaN or infinite values")
    return guide


def _inverse3(m: torch.Tensor) -> torch.Tensor:
    """Inverse of [3, 3, ...] matrices (one per trailing index) by cofactors."""
    cof = torch.empty_like(m)
    for i in range(3):
        for j in range(3):
            r0, r1 = [r for r in range(3) if r != i]
            c0, c1 = [c for c in range(3) if c != j]
            cof[i, j] = (-1) ** (i + j) * (m[r0, c0] * m[r1, c1] - m[r0, c1] * m[r1, c0])
    det = (m[0] * cof[0]).sum(0)
    return cof.transpose(0, 1) / det


def guided_filter(maps: torch.Tensor, image: torch.Tensor, radius: int = EDGE_RADIUS, eps: float = EDGE_EPS) -> torch.Tensor:
    """Edge-preserving filter of [K, H, W] maps guided by an image (He, Sun and Tang, "Guided Image
    Filtering", 2010/2013): in every (2r+1)^2 window each output is an affine function of the guide's
    colour, q = a . I + b, fitted to the map by ridge regression (eps); a and b are then averaged over
    the windows that cover each pixel. Where the image has an edge the output can jump there, so a
    blocky, blurred heat map snaps to the object's outline. Colour guide (3 x 3 covariance per pixel)
    for RGB images, the scalar form for grey ones. Returns float32 [K, H, W] (not clamped)."""
    if maps.dim() != 3:
        raise ValueError(f"maps must be [K, H, W]; got shape {tuple(maps.shape)}")
    if int(radius) < 0 or not float(eps) > 0:
        raise ValueError(f"radius must be >= 0 and eps > 0; got radius={radius}, eps={eps}")
    radius = int(radius)
    p = maps.float()
    guide = _as_guide(image, tuple(p.shape[1:])).to(p.device)
    c = guide.shape[0]
    mean_i = box_mean(guide, radius)  # [C, H, W]
    mean_p = box_mean(p, radius)  # [K, H, W]
    cov_ip = box_mean(guide[None] * p[:, None], radius) - mean_i[None] * mean_p[:, None]  # [K, C, H, W]
    if c == 1:
        var_i = box_mean(guide * guide, radius) - mean_i * mean_i  # [1, H, W]
        a = cov_ip / (var_i[None] + eps)
    else:
        outer = guide[:, None] * guide[None, :]  # [C, C, H, W]
        sigma = (box_mean(outer, radius) - mean_i[:, None] * mean_i[None, :]).double()
        sigma = sigma + eps * torch.eye(c, device=p.device, dtype=torch.float64)[:, :, None, None]
        # a = Sigma^-1 cov per pixel, with the 3 x 3 inverse in closed form (adjugate / determinant):
        # elementwise, about 20x faster than a batched solve over H * W small systems
        inv = _inverse3(sigma)
        a = torch.einsum("ijhw,kjhw->kihw", inv, cov_ip.double()).float()  # [K, C, H, W]
    b = mean_p - (a * mean_i[None]).sum(1)
    return (box_mean(a, radius) * guide[None]).sum(1) + box_mean(b, radius)


def refine_edges(maps: torch.Tensor, image: torch.Tensor, radius: int = EDGE_RADIUS, eps: float = EDGE_EPS) -> torch.Tensor:
    """Image-guided soft maps [K, H, W] in 0..1: `guided_filter` of the (bilinearly upsampled) heat,
    clamped to 0..1. Threshold the result as usual (`thresholds_for`) for masks with the image's edges."""
    return guided_filter(maps, image, radius, eps).clamp_(0.0, 1.0)


def refined_soft_map(heat: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], image: torch.Tensor,
                     radius: int = EDGE_RADIUS, eps: float = EDGE_EPS, crop: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Heat of any range [K, N] -> edge-refined soft maps [K, H, W] in 0..1: each row min-max normalised
    first (`minmax_rows`, in the heat's own precision: float64 stays float64 until `soft_map`), then
    bilinear to `size` (`soft_map`), then `refine_edges` guided by `image`.

    The one home of "min-max, then refine" for heat that is not already in 0..1 (a model's raw maps,
    a benchmark's pixel maps: pass `grid == size` for those, the resize is then the identity). The
    nodes' heat needs no normalising (`propagate` and the baselines return it in 0..1), so the Mask
    node calls `refine_edges` directly."""
    return refine_edges(soft_map(minmax_rows(heat), grid, size, crop), image, radius, eps)
