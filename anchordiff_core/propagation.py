"""One-hot anchor propagation over the gated graph (paper eqs. 12-13), batched over concepts."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ._checks import check_grid
from .anchors import anchor_seeds
from .auto import PAPER_STEPS
from .graph import GatedGraph


def minmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row linearly mapped to [0, 1]; a constant row becomes all zeros (not NaN)."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def propagate(
    graph: GatedGraph,
    anchors: torch.Tensor,
    steps: int = PAPER_STEPS,
    callback: Optional[Callable[[int, int], None]] = None,
    callback_every: int = 16,
) -> torch.Tensor:
    """s <- W_hat^T s for `steps` steps from one-hot seeds; returns [K, N] min-max normalised.

    All K concepts travel together as the columns of one [N, K] matrix, so a step is a single
    sparse-dense product.  `callback(done, total)` runs every `callback_every` steps (progress
    bars, interruption checks) and may raise to stop.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    seeds = anchor_seeds(anchors, graph.num_nodes, device=graph.device)
    single = seeds.shape[0] == 1
    # one concept: a sparse matrix-vector product (its own, 2-3x faster kernel); else [N, K]
    state = seeds[0].clone() if single else seeds.T.contiguous()
    step_once = (lambda s: torch.mv(graph.transition_t, s)) if single else (lambda s: graph.transition_t @ s)
    with _flush_denormals(graph.device), _one_cpu_thread(graph.device):
        for step in range(steps):
            state = step_once(state)
            if callback is not None and ((step + 1) % callback_every == 0 or step + 1 == steps):
                callback(step + 1, steps)
    return minmax_rows(state[None] if single else state.T)


def anchor_regions(heat: torch.Tensor, anchors: torch.Tensor, grid: tuple[int, int], connectivity: int = 8) -> torch.Tensor:
    """Keep each concept's heat only on the regions of its mask that hold one of its anchors.

    heat [K, N] (a propagation's output), anchors [K] or [K, M] token indices (-1 = none), grid (h, w).
    A concept's mask is its heat above the heat's mean (the paper's binary mask; the same tokens after
    min-max); its regions are the mask's 8-connected (or 4-connected) components on the token grid. The heat outside the
    regions that hold an anchor is set to 0, so a mask thresholded at the mean is exactly those regions.
    A concept none of whose anchors lies in its mask (a constant heat, say) is returned unchanged.

    Why (docs/DESIGN.md, "Anchor regions"): heat that the graph carries onto a separate look-alike
    object forms a region of its own, holding no anchor. Computed as a flood fill from the anchors
    (one 3 x 3 max-pool per step, all concepts at once; steps = the longest path inside a region)."""
    h, w = check_grid(heat.shape[-1], grid)
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8; got {connectivity!r}")
    if heat.dim() != 2:
        raise ValueError(f"heat must be [K, N]; got {tuple(heat.shape)}")
    idx = anchors.reshape(heat.shape[0], -1).to(heat.device)
    if bool((idx >= h * w).any()) or bool((idx < -1).any()):
        raise ValueError(f"anchor indices must be tokens 0..{h * w - 1} (or -1 for none); got {idx.tolist()}")
    mask = heat > heat.mean(dim=1, keepdim=True)
    seeds = torch.zeros_like(mask)
    valid = idx >= 0
    rows = torch.arange(heat.shape[0], device=heat.device)[:, None].expand_as(idx)
    seeds[rows[valid], idx[valid]] = True
    reach = seeds & mask
    held = reach.any(dim=1)
    mask_grid = mask.view(-1, 1, h, w)
    grown = reach.view(-1, 1, h, w).to(heat.dtype if heat.is_floating_point() else torch.float32)
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=grown.dtype, device=grown.device).view(1, 1, 3, 3)
    while True:
        near = F.max_pool2d(grown, 3, stride=1, padding=1) if connectivity == 8 else F.conv2d(grown, cross, padding=1)
        nxt = (near > 0) & mask_grid
        nxt = nxt.to(grown.dtype)
        if torch.equal(nxt, grown):
            break
        grown = nxt
    keep = grown.view(heat.shape[0], -1) > 0
    keep = torch.where(held[:, None], keep, torch.ones_like(keep))
    return torch.where(keep, heat, torch.zeros_like(heat))


@contextlib.contextmanager
def _flush_denormals(device: torch.device):
    """Mass that reaches far tokens from a one-hot seed is ~1e-40: denormal arithmetic makes a CPU
    step up to 50x slower. Values that small carry nothing after min-max normalisation."""
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """A step is ~0.1-0.5 ms of sparse work: split over threads, each of the 160 steps waits for
    the slowest, and on a busy CPU a descheduled thread stalls it for a whole time slice (measured
    0.2-3.2 s for K = 1 with 2 threads vs 32-79 ms with one). One thread, restored afterwards."""
    previous = torch.get_num_threads()
    single = device.type == "cpu" and previous > 1
    if single:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if single:
            torch.set_num_threads(previous)
