"""Input validation shared by the core functions: clear messages instead of deep torch errors."""
from __future__ import annotations

import torch


def as_float_matrix(x, name: str) -> torch.Tensor:
    """A 2-D floating tensor as float32 on its own device; rejects other shapes and NaN/inf."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {x.dtype}")
    x = x.float()
    # the sum is finite whenever every entry is (cheap: no N x N temporary); only if it is not,
    # look closer (it can also overflow on huge but finite values)
    if not torch.isfinite(x.sum()) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_grid(n: int, grid) -> tuple[int, int]:
    """(h, w) of the token grid, checked against the number of tokens."""
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (h, w); got {grid!r}") from None
    if h <= 0 or w <= 0 or h * w != n:
        raise ValueError(f"grid {h}x{w} does not match {n} tokens (h * w must equal N)")
    return h, w
