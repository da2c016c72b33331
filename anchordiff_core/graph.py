"""The hybrid affinity graph of AnchorDiff (paper eqs. 8-11), built sparse.

W_attn = cos(A_II rows), gate G = 1[W_attn > tau] with tau the `gate_percentile` percentile of
all N*N entries (numpy's default linear interpolation), W_cos = max(cos(O_II rows), 0),
W = W_cos * G, W_hat = W / rowsum(W).  Only the gated entries (about 2% at the default) are
kept, as the transposed transition matrix W_hat^T in CSR form, ready for propagation.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import as_float_matrix


@dataclass(frozen=True)
class GatedGraph:
    """Sparse transition graph over N image tokens.

    `transition_t` is W_hat^T (rows = destination token, columns = source token) in CSR form,
    so one propagation step is a plain sparse-dense product `transition_t @ s`.
    """

    transition_t: torch.Tensor
    num_nodes: int
    tau: float
    num_edges: int

    @property
    def device(self) -> torch.device:
        return self.transition_t.device

    @property
    def density(self) -> float:
        return self.num_edges / float(self.num_nodes * self.num_nodes)


def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


@contextlib.contextmanager
def exact_float32_matmul():
    """Disable TF32 for the duration: a 10-bit mantissa would flip gate entries near tau."""
    previous = torch.get_float32_matmul_precision()
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32


def cosine_similarity_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, N] cosine similarity of every pair of rows, in float32."""
    xn = normalize_rows(x.float())
    with exact_float32_matmul():
        return xn @ xn.T


def _lerp(a: float, b: float, t: float) -> float:
    # numpy's percentile interpolation, including its switch of form at t >= 0.5
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


def percentile(values: torch.Tensor, q: float) -> float:
    """`numpy.percentile(values, q)` (method 'linear') of all entries, as a Python float.

    Exact order statistics without sorting or copying everything (4096^2 entries exceed
    `torch.quantile`'s limit, and `topk` copies its input on the CPU): see `order_statistics`.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100]; got {q}")
    flat = values.reshape(-1)
    m = flat.numel()
    if m == 0:
        raise ValueError("percentile of an empty tensor")
    position = (m - 1) * (q / 100.0)
    lo = int(math.floor(position))
    hi = min(lo + 1, m - 1)
    v_lo, v_hi = order_statistics(flat, lo, hi)
    return _lerp(v_lo, v_hi, position - lo)


def order_statistics(flat: torch.Tensor, lo: int, hi: int, max_candidates: int = 1 << 20) -> tuple[float, float]:
    """Values of ascending ranks `lo` <= `hi` (0-based; hi <= lo + 1) of a 1-D tensor.

    Narrows a value interval [low, high] known to hold both ranks with histograms until few
    candidates are left, then sorts only those.  Counts come from exact comparisons, never from
    the histogram's own binning, so rounding at bin edges cannot shift a rank.  Extra memory: a
    few boolean masks (a quarter of the input each).
    """
    low, high = flat.min().item(), flat.max().item()
    below = 0  # number of entries strictly below `low`
    bins = 4096

    def between(a: float, b: float) -> torch.Tensor:
        return (flat >= a).logical_and_(flat <= b)

    while True:
        in_range = between(low, high)
        if int(torch.count_nonzero(in_range)) <= max_candidates or low == high:
            candidates = flat[in_range].sort().values
            return candidates[lo - below].item(), candidates[hi - below].item()
        del in_range
        cumulative = torch.histc(flat, bins=bins, min=low, max=high).cumsum(0)
        ranks = torch.tensor([lo - below + 1, hi - below + 1], dtype=cumulative.dtype, device=cumulative.device)
        first, last = (int(i) for i in torch.searchsorted(cumulative, ranks))
        width = (high - low) / bins
        new_low = low + max(first - 1, 0) * width  # one bin of slack on each side for rounding
        new_high = min(high, low + (min(last, bins - 1) + 2) * width)
        new_below = int(torch.count_nonzero(flat < new_low))
        inside = int(torch.count_nonzero(between(new_low, new_high)))
        if not (new_below <= lo and hi < new_below + inside) or (new_low, new_high) == (low, high):
            candidates = flat[between(low, high)].sort().values  # heavy ties: sort the interval
            return candidates[lo - below].item(), candidates[hi - below].item()
        low, high, below = new_low, new_high, new_below


def _largest_float32_at_most(x: float) -> torch.Tensor:
    """float32 threshold t32 with (v > t32) == (v > x) for every float32 v."""
    t32 = torch.tensor(x, dtype=torch.float64).float()
    if t32.double().item() > x:
        t32 = torch.nextafter(t32, torch.tensor(-math.inf))
    return t32


def build_gated_graph(a_ii: torch.Tensor, o_ii: torch.Tensor, gate_percentile: Optional[float] = 98.0) -> GatedGraph:
    """AnchorDiff's gated graph from head/layer-averaged A_II [N, N] and O_II [N, D].

    `gate_percentile=None` drops the gate (the paper's "w/o A_II gate" ablation; dense, slow).
    Peak memory is about 1.3 N^2 float32 values: one N x N buffer (first W_attn, then reused for
    W_cos) and the boolean gate.
    """
    a_ii = as_float_matrix(a_ii, "a_ii")
    o_ii = as_float_matrix(o_ii, "o_ii")
    n = a_ii.shape[0]
    if a_ii.shape != (n, n):
        raise ValueError(f"a_ii must be a square [N, N] attention matrix; got shape {tuple(a_ii.shape)}")
    if o_ii.shape[0] != n:
        raise ValueError(f"o_ii must have one row per image token ({n}); got shape {tuple(o_ii.shape)}")
    o_ii = o_ii.to(a_ii.device)

    with exact_float32_matmul():
        # W_attn = (A A^T) / (|a_i| |a_j|), scaled in place: no normalised copy of A is made
        buffer = a_ii @ a_ii.T
        norms = a_ii.norm(dim=1).clamp_min(1e-12)
        buffer.div_(norms[:, None]).div_(norms[None, :])
        _symmetrize_(buffer)
        if gate_percentile is None:
            tau = -math.inf
            gate = torch.ones(n, n, dtype=torch.bool, device=buffer.device)
        else:
            tau = percentile(buffer, gate_percentile)
            gate = buffer > _largest_float32_at_most(tau).to(buffer.device)
        on = normalize_rows(o_ii)
        torch.mm(on, on.T, out=buffer)  # W_cos, reusing the W_attn memory
        del on
    rows, cols = gate.nonzero(as_tuple=True)  # row-major order
    values = buffer[gate].clamp_min_(0.0)
    del buffer, gate

    keep = values > 0  # zero weights carry nothing; dropping them keeps the matrix small
    rows, cols, values = rows[keep], cols[keep], values[keep]
    row_sums = torch.zeros(n, dtype=torch.float32, device=values.device).index_add_(0, rows, values)
    empty = (row_sums == 0).nonzero(as_tuple=True)[0]
    if empty.numel():
        # only if a token's own (diagonal) entry failed the gate: keep the seed where it is
        rows = torch.cat([rows, empty])
        cols = torch.cat([cols, empty])
        values = torch.cat([values, torch.ones_like(empty, dtype=values.dtype)])
        row_sums[empty] = 1.0
    values = values / row_sums[rows]
    return GatedGraph(_transposed_csr(rows, cols, values, n), n, tau, int(values.numel()))


def _symmetrize_(w: torch.Tensor, block: int = 1024) -> None:
    """Make w exactly symmetric, in place, block by block.

    W_attn is symmetric by definition, so its order statistics come in equal pairs and the 98th
    percentile often falls exactly on one: strict `>` must then drop both copies.  Rounding in the
    matmul can leave the copies an ulp apart; averaging them restores the exact symmetry.
    """
    n = w.shape[0]
    for r in range(0, n, block):
        for c in range(r, n, block):
            mean = (w[r : r + block, c : c + block] + w[c : c + block, r : r + block].T) * 0.5
            w[r : r + block, c : c + block] = mean
            w[c : c + block, r : r + block] = mean.T


def _transposed_csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """CSR of the transpose of the COO matrix (rows, cols, values)."""
    order = torch.argsort(cols * n + rows)
    t_rows, t_cols, t_vals = cols[order], rows[order], values[order]
    index_dtype = torch.int32 if n * n < 2**31 else torch.int64  # int32 halves index traffic
    crow = torch.zeros(n + 1, dtype=torch.int64, device=values.device)
    crow[1:] = torch.bincount(t_rows, minlength=n).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            crow.to(index_dtype), t_cols.to(index_dtype), t_vals, (n, n), check_invariants=False
        )
