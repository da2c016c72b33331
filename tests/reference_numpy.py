"""A literal, dense, float64 numpy transcription of AnchorDiff eqs. 8-13, for tests only.

Written without looking at the sparse implementation's tricks: full N x N matrices, numpy's own
percentile, a plain loop of matrix-vector products.
"""
import numpy as np


def cosine_rows(x):
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    xn = x / np.maximum(norms, 1e-12)
    return xn @ xn.T


def gated_transition(a_ii, o_ii, gate_percentile=98.0, weights="output"):
    w_attn = cosine_rows(a_ii)                      # eq. 8
    w_attn = (w_attn + w_attn.T) / 2                # symmetric by definition: exactly so
    if gate_percentile is None:                     # the "w/o gate" ablation
        tau, gate = -np.inf, np.ones_like(w_attn)
    else:
        tau = np.percentile(w_attn, gate_percentile)  # eq. 9, 98th percentile of all entries
        gate = (w_attn > tau).astype(np.float64)
    w_cos = np.maximum(cosine_rows(o_ii), 0.0)      # eq. 10, negatives clamped
    if weights == "attention":                      # the "w/o W_cos" ablation: W_attn as the weights
        w_cos = np.maximum(w_attn, 0.0)
    w = w_cos * gate                                # eq. 11
    sums = w.sum(axis=1, keepdims=True)
    for i in np.where(sums[:, 0] == 0)[0]:          # documented guard: empty row keeps a self-loop
        w[i, i], sums[i, 0] = 1.0, 1.0
    return w / sums, tau, w_attn


def propagate(w_hat, seeds, steps=160):
    s = np.asarray(seeds, dtype=np.float64).T       # [N, K]
    for _ in range(steps):                          # eq. 12
        s = w_hat.T @ s
    s = s.T
    lo = s.min(axis=1, keepdims=True)
    hi = s.max(axis=1, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (s - lo) / np.where(span > 0, span, 1.0), 0.0)  # eq. 13


def one_hot(anchors, n):
    seeds = np.zeros((len(anchors), n))
    seeds[np.arange(len(anchors)), anchors] = 1.0
    return seeds


def head_averaged_attention(q, k, v, heads):
    """Naive per-head attention over image keys: returns (A [B,N,N], O [B,N,H*d])."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    b, n, dim = q.shape
    d = dim // heads
    a = np.zeros((b, n, n))
    o = np.zeros((b, n, dim))
    for i in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            logits = q[i, :, sl] @ k[i, :, sl].T / np.sqrt(d)
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            a[i] += p / heads
            o[i, :, sl] = p @ v[i, :, sl]
    return a, o


def consensus_map(maps, power=1.0):
    """Leave-one-out agreement weighting of S maps per concept, written as loops: maps [S, K, N]."""
    m = np.maximum(np.asarray(maps, dtype=np.float64), 0.0)
    s_count, k_count, _ = m.shape
    out = []
    weights = np.zeros((s_count, k_count))
    for k in range(k_count):
        p = [m[s, k] / max(m[s, k].sum(), 1e-30) for s in range(s_count)]
        for s in range(s_count):
            rest = sum(p[t] for t in range(s_count) if t != s) / (s_count - 1)
            cos = float(p[s] @ rest) / max(np.linalg.norm(p[s]) * np.linalg.norm(rest), 1e-30)
            weights[s, k] = max(cos, 0.0) ** power
        w = weights[:, k] if weights[:, k].sum() > 0 else np.ones(s_count)
        out.append(sum(w[s] * p[s] for s in range(s_count)) / w.sum())
    return np.stack(out), weights


def grid_smooth(maps, grid, sigma):
    """Gaussian smoothing of maps [K, N] on a row-major (h, w) token grid, written as loops over token
    pairs: weight g(dy) g(dx) with g the 1-D Gaussian exp(-d^2 / 2 sigma^2) over |d| <= ceil(4 sigma),
    normalised to sum 1 over that window; tokens outside the grid count as zero."""
    import math
    h, w = grid
    r = max(1, math.ceil(4 * sigma))
    g = {d: math.exp(-0.5 * (d / sigma) ** 2) for d in range(-r, r + 1)}
    total = sum(g.values())
    m = np.asarray(maps, dtype=np.float64)
    out = np.zeros_like(m)
    for i in range(h * w):
        yi, xi = divmod(i, w)
        for j in range(h * w):
            yj, xj = divmod(j, w)
            if abs(yi - yj) <= r and abs(xi - xj) <= r:
                out[:, i] += g[yj - yi] * g[xj - xi] / total ** 2 * m[:, j]
    return out
