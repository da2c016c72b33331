"""The hybrid affinity graph of AnchorDiff (paper eqs. 8-11), built sparse.

W_attn = cos(A_II rows), gate G = 1[W_attn > tau] with tau the `gate_percentile` percentile of
all N*N entries (numpy's default linear interpolation), W_cos = max(cos(O_II rows), 0),
W = W_cos * G, W_hat = W / rowsum(W).  Only the gated entries (about 2% at the default) are
kept, as the transposed transition matrix W_hat^T in CSR form, ready for propagation.

`weights="attention"` is the paper's "w/o W_cos" ablation (Table 5): W = max(W_attn, 0) * G, the
graph from the attention rows alone (O_II is then not used; the paper does not spell out the
ablation's weights, and W_attn is the only affinity left).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._checks import as_float_matrix
from .attention import float32_matmul
from .auto import PAPER_GATE_PERCENTILE


WEIGHTS = ("output", "attention")  # the edge weights: W_cos (the paper) or W_attn ("w/o W_cos")


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


def exact_float32_matmul():
    """No TF32 for the duration: a 10-bit mantissa would flip gate entries near tau."""
    return float32_matmul(exact=True)


def cosine_similarity_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, N] cosine similarity of every pair of rows, in float32."""
    xn = normalize_rows(x.float())
    with exact_float32_matmul():
        return xn @ xn.T


def _lerp(a: float, b: float, t: float) -> float:
    # numpy's percentile interpolation, including its switch of form at t >= 0.5
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


def percentile(values: torch.Tensor, q: float, interrupt: Optional[Callable[[], None]] = None) -> float:
    """`numpy.percentile(values, q)` (method 'linear') of all entries, as a Python float.

    Exact order statistics without sorting or copying everything (4096^2 entries exceed
    `torch.quantile`'s limit, and `topk` copies its input on the CPU): see `order_statistics`.
    """
    _check_percentile(q)
    flat = values.reshape(-1)
    m = flat.numel()
    if m == 0:
        raise ValueError("percentile of an empty tensor")
    position = (m - 1) * (q / 100.0)
    lo = int(math.floor(position))
    hi = min(lo + 1, m - 1)
    v_lo, v_hi = order_statistics(flat, lo, hi, interrupt=interrupt)
    return _lerp(v_lo, v_hi, position - lo)


def _check_percentile(q: float) -> None:
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100]; got {q}")


def order_statistics(
    flat: torch.Tensor, lo: int, hi: int, max_candidates: int = 1 << 20, interrupt: Optional[Callable[[], None]] = None,
) -> tuple[float, float]:
    """Values of ascending ranks `lo` <= `hi` (0-based; hi <= lo + 1) of a 1-D tensor.

    Narrows a value interval [low, high] known to hold both ranks with histograms until few
    candidates are left, then counts the distinct candidates.  Counts come from exact
    comparisons, never from the histogram's own binning, so rounding at bin edges cannot shift a
    rank.  Every pass reads the input in chunks (2^21 entries on a CPU): extra memory is a few chunk-sized
    masks, whatever the input's size; `interrupt()` runs between chunks.
    """
    check = interrupt if interrupt is not None else (lambda: None)
    chunk = 4 * _chunk_elements(flat.device)

    def chunks():
        for start in range(0, flat.numel(), chunk):
            yield flat[start : start + chunk]
            check()

    def count(a: float, b: float) -> int:  # entries in [a, b]
        return sum(int(torch.count_nonzero((c >= a).logical_and_(c <= b))) for c in chunks())

    def count_below(a: float) -> int:
        return sum(int(torch.count_nonzero(c < a)) for c in chunks())

    low, high = flat.min().item(), flat.max().item()
    below = 0  # number of entries strictly below `low`
    bins = 4096
    while low != high and count(low, high) > max_candidates:
        cumulative = sum(torch.histc(c, bins=bins, min=low, max=high) for c in chunks()).cumsum(0)
        ranks = torch.tensor([lo - below + 1, hi - below + 1], dtype=cumulative.dtype, device=cumulative.device)
        first, last = (int(i) for i in torch.searchsorted(cumulative, ranks))
        width = (high - low) / bins
        new_low = low + max(first - 1, 0) * width  # one bin of slack on each side for rounding
        new_high = min(high, low + (min(last, bins - 1) + 2) * width)
        new_below = count_below(new_low)
        if not (new_below <= lo and hi < new_below + count(new_low, new_high)) or (new_low, new_high) == (low, high):
            break  # heavy ties: the interval holds few distinct values; count them below
        low, high, below = new_low, new_high, new_below
    if low == high:
        return low, low
    # distinct values in [low, high] with their counts, merged chunk by chunk
    values = torch.empty(0, dtype=flat.dtype, device=flat.device)
    counts = torch.empty(0, dtype=torch.long, device=flat.device)
    for c in chunks():
        v, k = torch.unique(c[(c >= low).logical_and_(c <= high)], return_counts=True)
        values, inverse = torch.unique(torch.cat([values, v]), return_inverse=True)
        counts = torch.zeros(values.numel(), dtype=torch.long, device=flat.device).index_add_(0, inverse, torch.cat([counts, k]))
    ends = counts.cumsum(0)  # rank (relative to `below`) just past each distinct value
    found = torch.searchsorted(ends, torch.tensor([lo - below, hi - below], device=ends.device), right=True)
    return values[found[0]].item(), values[found[1]].item()


def _largest_float32_at_most(x: float) -> torch.Tensor:
    """float32 threshold t32 with (v > t32) == (v > x) for every float32 v."""
    t32 = torch.tensor(x, dtype=torch.float64).float()
    if t32.double().item() > x:
        t32 = torch.nextafter(t32, torch.tensor(-math.inf))
    return t32


def build_gated_graph(
    a_ii,
    o_ii,
    gate_percentile: Optional[float] = PAPER_GATE_PERCENTILE,
    interrupt: Optional[Callable[[], None]] = None,
    device=None,
    weights: str = "output",
) -> GatedGraph:
    """AnchorDiff's gated graph from head-averaged A_II [N, N] and O_II [N, D].

    `a_ii` / `o_ii` may also be several layers' maps ([G, N, N] / [G, N, D] tensors, or sequences
    of [N, N] / [N, D] tensors, e.g. views into a recording): they are averaged here, so no
    stacked copy is ever made.  `gate_percentile=None` drops the gate (the paper's "w/o A_II gate"
    ablation; dense, slow).  `weights`: "output" (the paper: W_cos from O_II) or "attention" (the
    "w/o W_cos" ablation: W_attn itself as the weights).  `interrupt()` is called between chunks of work (each well under a
    second at 2048 x 2048 on a CPU core) and may raise to stop.  The graph is built on `device`
    (default: where `a_ii` is).

    Extra memory, in N x N float32 buffers: the layer mean of A_II (only with several layers;
    freed once W_attn is computed), W_attn (1), the kept edges (~0.04 at the default gate) and
    chunk temporaries; W_cos, the gate and the normalised rows are never stored whole.
    """
    check = interrupt if interrupt is not None else (lambda: None)
    a_layers = _layers(a_ii, "a_ii")
    o_layers = _layers(o_ii, "o_ii")
    n = a_layers[0].shape[0]
    device = a_layers[0].device if device is None else torch.device(device)
    for a in a_layers:
        if a.shape != (n, n):
            raise ValueError(f"a_ii must be square [N, N] attention matrices; got shape {tuple(a.shape)}")
    for o in o_layers:
        if o.shape[0] != n or o.shape != o_layers[0].shape:
            raise ValueError(f"o_ii must have one row per image token ({n}); got shape {tuple(o.shape)}")

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS} ('output' = the paper's W_cos); got {weights!r}")
    attention_weights = weights == "attention"
    if gate_percentile is not None:
        _check_percentile(gate_percentile)
    w_attn = _attention_cosines(_layer_mean(a_layers, device, check), check) if gate_percentile is not None or attention_weights else None
    if gate_percentile is None:
        tau, threshold = -math.inf, None
    else:
        tau = percentile(w_attn, gate_percentile, check)
        threshold = _largest_float32_at_most(tau).to(device)
    if attention_weights:
        o = None
    else:
        o = _layer_mean(o_layers, device, check)
        o_norms = o.norm(dim=1).clamp_min(1e-12)

    # W = W_cos * G row block by row block; W is symmetric (W_attn exactly, by construction),
    # so row j of W is column j of W: the blocks come out as rows of W^T, in CSR order.
    counts, cols, values = [], [], []
    index_dtype = torch.int32 if n * n < 2**31 else torch.int64  # int32 halves index traffic
    width = 1 if attention_weights else o.shape[1]
    rows_per_chunk = max(1, min(_work_per_chunk(device) // max(1, n * width), _chunk_elements(device) // n))
    with exact_float32_matmul():
        for start in range(0, n, rows_per_chunk):
            stop = min(start + rows_per_chunk, n)
            if attention_weights:
                w = w_attn[start:stop].clone()
            else:
                w = torch.mm(o[start:stop], o.T).div_(o_norms[start:stop, None]).div_(o_norms[None, :])
            keep = w > 0  # zero weights carry nothing; dropping them keeps the matrix small
            if threshold is not None:
                keep &= w_attn[start:stop] > threshold
            counts.append(keep.sum(dim=1))
            cols.append(keep.nonzero()[:, 1].to(index_dtype))
            values.append(w[keep])
            del w, keep
            check()
    del w_attn, o
    counts, cols, values = torch.cat(counts), torch.cat(cols), torch.cat(values)

    # W_hat = W / rowsum(W); the row sums of W are the column sums of W^T
    row_sums = torch.zeros(n, dtype=torch.float32, device=device).index_add_(0, cols.long(), values)
    empty = (row_sums == 0).nonzero(as_tuple=True)[0]
    if empty.numel():
        # only if a token's own (diagonal) entry failed the gate: keep the seed where it is
        rows = torch.repeat_interleave(torch.arange(n, device=device), counts)
        rows, cols, values = torch.cat([rows, empty]), torch.cat([cols, empty.to(index_dtype)]), torch.cat([values, torch.ones_like(empty, dtype=values.dtype)])
        order = torch.argsort(rows * n + cols.long())
        rows, cols, values = rows[order], cols[order], values[order]
        counts = torch.bincount(rows, minlength=n)
        row_sums[empty] = 1.0
    values.div_(row_sums[cols.long()])
    crow = torch.zeros(n + 1, dtype=torch.int64, device=device)
    crow[1:] = counts.cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        transition_t = torch.sparse_csr_tensor(crow.to(index_dtype), cols, values, (n, n), check_invariants=False)
    return GatedGraph(transition_t, n, tau, int(values.numel()))


def _layers(x, name: str) -> list[torch.Tensor]:
    """One map or several layers' maps -> list of 2-D float32 tensors (views where possible)."""
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        x = list(x.unbind(0))
    elif isinstance(x, (list, tuple)):
        x = list(x)
    else:
        x = [x]
    if not x:
        raise ValueError(f"{name}: no layers given")
    return [as_float_matrix(layer, name) for layer in x]


def _layer_mean(layers: list[torch.Tensor], device, check: Callable[[], None]) -> torch.Tensor:
    """Mean of the layers on `device`: the input itself for one layer, else one new buffer, summed
    in blocks of rows with `check()` between them (2 x 1 GiB at 2048 x 2048 take about a second)."""
    if len(layers) == 1:
        return layers[0].to(device)
    n = layers[0].shape[0]
    mean = torch.empty(layers[0].shape, dtype=torch.float32, device=device)
    rows = max(1, 8 * _chunk_elements(device) // max(1, layers[0].shape[1]))
    for start in range(0, n, rows):
        block = mean[start : start + rows]
        block.copy_(layers[0][start : start + rows])
        for layer in layers[1:]:
            block.add_(layer[start : start + rows].to(device))
        block.div_(len(layers))
        check()
    return mean


def _work_per_chunk(device: torch.device) -> int:
    """Multiply-adds per chunk: ~0.1 s on one CPU core, so interruption is quick; more elsewhere."""
    return 2**32 if torch.device(device).type == "cpu" else 2**36


def _chunk_elements(device: torch.device) -> int:
    """Entries of one chunk's [rows, N] temporaries: 2 MB of float32 on a CPU (cache-sized, and
    small next to the N x N buffer), 64 MB elsewhere."""
    return 2**19 if torch.device(device).type == "cpu" else 2**24


def _attention_cosines(a: torch.Tensor, check: Callable[[], None]) -> torch.Tensor:
    """W_attn = cos(A rows) [N, N], exactly symmetric: tile (i, j) is computed once and mirrored.

    W_attn's order statistics then come in equal pairs, so strict `>` at a tau that falls on one
    drops both copies.  The upper triangle is half the work of the full product.
    """
    n = a.shape[0]
    norms = a.norm(dim=1).clamp_min(1e-12)
    tile = max(256, min(n, int(math.sqrt(_work_per_chunk(a.device) / n)), int(math.sqrt(_chunk_elements(a.device)))))
    out = torch.empty(n, n, dtype=torch.float32, device=a.device)
    with exact_float32_matmul():
        for r in range(0, n, tile):
            for c in range(r, n, tile):
                block = torch.mm(a[r : r + tile], a[c : c + tile].T)
                block.div_(norms[r : r + tile, None]).div_(norms[None, c : c + tile])
                out[r : r + tile, c : c + tile] = block
                if r == c:  # a + b == b + a: exactly symmetric
                    out[r : r + tile, c : c + tile].add_(block.T).mul_(0.5)
                else:
                    out[c : c + tile, r : r + tile] = block.T
                del block
                check()
    return out
