"""One-hot anchor propagation over the gated graph (paper eqs. 12-13), batched over concepts."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

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
