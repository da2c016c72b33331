"""Naive dense AnchorDiff (eqs. 8-13) in torch: the baseline the benchmarks compare against.

Every matrix is a dense N x N float32 tensor, as a direct transcription would write it.
"""
import numpy as np
import torch
import torch.nn.functional as F

from anchordiff_core.auto import PAPER_GATE_PERCENTILE, PAPER_STEPS


def dense_transition(a_ii, o_ii, gate_percentile=PAPER_GATE_PERCENTILE):
    an = F.normalize(a_ii.float(), dim=1)
    w_attn = an @ an.T
    # torch.quantile refuses more than 16M entries (4096^2 is 16.8M): go through numpy
    tau = float(np.percentile(w_attn.cpu().numpy(), gate_percentile))
    gate = w_attn > tau
    on = F.normalize(o_ii.float(), dim=1)
    w = (on @ on.T).clamp_min(0) * gate
    return w / w.sum(dim=1, keepdim=True)


def dense_propagate(w_hat, anchors, steps=PAPER_STEPS):
    s = torch.zeros(w_hat.shape[0], len(anchors), device=w_hat.device)
    s[anchors, torch.arange(len(anchors))] = 1.0
    s = s.T.contiguous()  # [K, N]: one step is s W_hat, i.e. (W_hat^T s^T)^T, the fast dense form
    for _ in range(steps):
        s = s @ w_hat
    lo, hi = s.min(1, keepdim=True).values, s.max(1, keepdim=True).values
    return (s - lo) / (hi - lo)
