"""Attention maps recomputed from per-head q, k, v, in chunks: no [heads, N, N] tensor is ever built.

Layout follows ComfyUI's attention calls: q, k, v are [B, L, heads * head_dim].  Maps are
computed and accumulated in float32 whatever the model's dtype, on the device of the inputs.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F



PRECISIONS = ("exact", "fast")


def fused_kernels(device):
    """anchordiff_core.fused_attention (the Triton head-mean kernels) when they can run on `device`:
    CUDA with triton installed, or triton's CPU interpreter (TRITON_INTERPRET=1, for tests); else None.
    ANCHORDIFF_TRITON=0 in the environment turns them off (the head-by-head path then runs)."""
    if os.environ.get("ANCHORDIFF_TRITON", "1") == "0" or _fused_failure is not None:
        return None
    try:
        from . import fused_attention
    except ModuleNotFoundError as error:
        if error.name != "triton":
            raise
        return None
    except Exception as error:  # noqa: BLE001  a triton whose language lacks what the kernels use
        _fused_failed(None, error)
        return None
    return fused_attention if fused_attention.usable_on(device) else None


_fused_failure: Optional[str] = None  # why the kernels failed on this machine; then never tried again


def _fused_failed(fused, error: Exception) -> None:
    """The kernels failed to import, compile or run here (a triton or GPU they do not support): warn once and
    record head by head from now on (slower, the same maps up to rounding). In triton's interpreter
    (the tests) and when memory ran out, the error is raised as it is."""
    global _fused_failure
    interpreted = fused.interpreted() if fused is not None else os.environ.get("TRITON_INTERPRET", "0") != "0"
    if interpreted or isinstance(error, torch.OutOfMemoryError):
        raise error
    _fused_failure = f"{type(error).__name__}: {error}"[:500]
    warnings.warn(f"AnchorDiff: the fused Triton attention kernels failed on this GPU ({_fused_failure}); recording "
                  "continues head by head (slower, same maps). Set ANCHORDIFF_TRITON=0 to skip them.", RuntimeWarning)


@contextlib.contextmanager
def float32_matmul(exact: bool = True):
    """exact: no TF32 for the duration (a 10-bit mantissa would flip gate entries near tau).
    Not exact: TF32 products with float32 accumulation where the hardware has them (CUDA); on
    inputs that come from bfloat16 (8-bit mantissa) TF32 products are still exact."""
    previous = torch.get_float32_matmul_precision()
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest" if exact else "high")
    torch.backends.cuda.matmul.allow_tf32 = not exact
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
        torch.backends.cuda.matmul.allow_tf32 = cuda_tf32


def default_chunk_bytes(device: torch.device) -> int:
    """Bytes of one head's attention scores per chunk: on CPUs a few MB, so each chunk's softmax,
    head sum and output product run from cache (4 MB measured fastest at 4096 tokens on this
    project's 2-core AMD EPYC, 1.6x over all heads at once in 8 MB chunks); large on
    accelerators, where bigger matmuls win and memory is the only limit."""
    return 4 * 2**20 if torch.device(device).type == "cpu" else 64 * 2**20


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*d] -> [B, H, L, d] float32."""
    b, length, dim = x.shape
    if dim % heads:
        raise ValueError(f"feature size {dim} is not divisible by {heads} heads")
    return x.float().view(b, length, heads, dim // heads).transpose(1, 2)


def _no_check() -> None:
    """The `interrupt` of a computation nobody can stop."""


def _rows_per_chunk(heads: int, keys: int, max_chunk_bytes: Optional[int], device) -> int:
    budget = default_chunk_bytes(device) if max_chunk_bytes is None else int(max_chunk_bytes)
    return max(1, budget // (heads * keys * 4))


def image_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    max_chunk_bytes: Optional[int] = None,
    out_a: Optional[torch.Tensor] = None,
    out_o: Optional[torch.Tensor] = None,
    extra_keys: Optional[torch.Tensor] = None,
    extra_columns: Optional[torch.Tensor] = None,
    precision: str = "exact",
    interrupt: Optional[Callable[[], None]] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A_II and O_II of the paper (eqs. 3-4) from image-token q, k, v [B, N, H*d].

    A = mean over heads of softmax(q_h k_h^T / sqrt(d)) with the softmax over image keys only
    -> [B, N, N];  O = A_h v_h per head, heads concatenated -> [B, N, H*d].
    `out_a` / `out_o` (on q's device) receive the results chunk by chunk, so a result never exists
    twice: float32, or narrower (the recorder's compact A in float16), always summed in float32
    first.  Head by head, in chunks of query rows (`max_chunk_bytes` of one head's scores): no
    [heads, N, N] tensor is ever built.

    precision "exact": everything in float32 (no TF32).  "fast": O through the fused attention
    kernel (scaled_dot_product_attention) in the inputs' own dtype; A by the Triton kernels of
    `fused_attention` where they run (CUDA with triton), else head by head as in exact with the
    scores' products in TF32 where available; always accumulated and averaged in float32 (see
    docs/DESIGN.md).

    With `extra_keys` [B, M, H*d] it also returns, per image query, the head-averaged probability
    on `extra_columns` (indices into the extra keys) of a softmax over [image keys; extra keys]
    -> [B, N, len(extra_columns)]: Seg4Diff's map, read from the same image scores.

    `interrupt()` (it raises to stop) runs after each head's chunk of query rows, so a stop request
    waits for one chunk (a few MB of scores on a CPU), not for the whole block.
    """
    check = interrupt if interrupt is not None else _no_check
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got '{precision}'")
    fast = precision == "fast"
    b, n, width = q.shape
    if width % heads:
        raise ValueError(f"feature size {width} is not divisible by {heads} heads")
    d = width // heads
    a_mean = torch.empty(b, n, n, dtype=torch.float32, device=q.device) if out_a is None else out_a
    out = torch.empty(b, n, width, dtype=torch.float32, device=q.device) if out_o is None else out_o
    if a_mean.shape != (b, n, n) or out.shape != (b, n, width):
        raise ValueError("out_a / out_o have the wrong shape")
    if fast:
        split = lambda t: t.view(b, t.shape[1], heads, d).transpose(1, 2)  # noqa: E731 (model dtype)
        out.copy_(F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, width))
        vh = None
        fused = fused_kernels(q.device)
        if fused is not None:
            try:
                lse = fused.row_logsumexp(q, k, heads)
                fused.head_mean_probs(q, k, heads, lse, out=a_mean)
            except Exception as error:  # noqa: BLE001 (triton's compile errors have no common base)
                _fused_failed(fused, error)  # the head-by-head path below rewrites a_mean whole
            else:
                extra = None
                if extra_keys is not None:
                    extra = _extra_column_probs(q, extra_keys, extra_columns.to(q.device), heads, lse)
                return a_mean, out, extra
    else:
        vh = split_heads(v, heads).contiguous()
    qh = (split_heads(q, heads) * d**-0.5).contiguous()  # scale the small queries, not the big scores (d = 64: exact)
    kh = split_heads(k, heads).contiguous()  # one head's rows adjacent: 1.5x faster products on a CPU
    extra = None
    if extra_keys is not None:
        eh = split_heads(extra_keys, heads)
        columns = extra_columns.to(q.device)
        extra = torch.zeros(b, n, columns.numel(), dtype=torch.float32, device=q.device)
    rows = _rows_per_chunk(1, n, max_chunk_bytes, q.device)
    with float32_matmul(exact=not fast):
        for i in range(b):
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                total = a_mean[i, start:stop]
                if total.dtype != torch.float32:  # a compact store: sum in float32, round once
                    total = torch.empty(total.shape, dtype=torch.float32, device=total.device)
                for h in range(heads):
                    scores = torch.mm(qh[i, h, start:stop], kh[i, h].T)  # [c, N]
                    if extra is None:
                        probs = scores.softmax(dim=-1)  # fused, row by row
                    else:  # one exp pass serves both softmaxes
                        top = scores.amax(dim=-1, keepdim=True)
                        probs = scores.sub_(top).exp_()
                        sums = probs.sum(dim=-1, keepdim=True)
                        probs.div_(sums)
                        extra_scores = torch.mm(qh[i, h, start:stop], eh[i, h].T)  # [c, M]
                        joint = torch.logaddexp(top + sums.log(), extra_scores.logsumexp(dim=-1, keepdim=True))
                        extra[i, start:stop] += torch.exp(extra_scores[:, columns] - joint)
                    del scores
                    if h == 0:
                        total.copy_(probs)
                    else:
                        total.add_(probs)
                    if vh is not None:
                        out[i, start:stop, h * d : (h + 1) * d] = torch.mm(probs, vh[i, h])
                    del probs
                    check()
                total.div_(heads)
                if total.data_ptr() != a_mean[i, start:stop].data_ptr():
                    a_mean[i, start:stop].copy_(total)
                del total
    if extra is not None:
        extra.div_(heads)
    return a_mean, out, extra


# torch.nn.attention.SDPBackend values (torch._fused_sdp_choice returns them as ints)
_SDP_FLASH, _SDP_EFFICIENT, _SDP_CUDNN = 1, 2, 3


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """F.scaled_dot_product_attention(q, k, v) (no mask, default scale; [B, H, L, d]) through the fused
    kernel PyTorch picks for these inputs, called directly so that it also hands back its per-row
    log-sum-exp of the scaled scores: (out, lse [B, H, Lq] float32).  None where that pick returns
    none (the math fallback, a backend this does not know) or the direct call fails.

    The recorder uses it to read the model's own softmax normaliser instead of recomputing q k^T for
    the image-to-concept maps (nodes/model_patch.py checks, once per recording call and input shape,
    that the output is bit-identical to the model's own attention call before using it: a kernel
    picked differently there, e.g. under another sdpa_kernel priority, just turns this off)."""
    try:
        choice = int(torch._fused_sdp_choice(q, k, v))
        if q.device.type == "cpu":
            if choice != _SDP_FLASH:
                return None
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        elif choice == _SDP_FLASH:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
        elif choice == _SDP_EFFICIENT:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        elif choice == _SDP_CUDNN:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
        else:
            return None
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return None
    b, h, lq = q.shape[0], q.shape[1], q.shape[2]
    if lse.dim() == 4 and lse.shape[-1] == 1:  # cuDNN: [B, H, L, 1]
        lse = lse[..., 0]
    if lse.dim() != 3 or lse.shape[:2] != (b, h) or lse.shape[2] < lq:
        return None
    return out, lse[:, :, :lq].float()  # memory-efficient attention pads the rows to a multiple of 32


def lse_matches(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, samples: int = 64) -> bool:
    """Whether `lse` [B, H, Lq] is the natural log-sum-exp of q k^T / sqrt(d) ([B, H, L, d]) on `samples`
    query rows spread over the sequence (float32 reference, 1e-3 absolute + 1e-4 relative)."""
    rows = torch.linspace(0, q.shape[2] - 1, min(samples, q.shape[2]), device=q.device).round().long().unique()
    with float32_matmul(exact=True):
        scores = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    reference = scores.logsumexp(dim=-1)
    return bool(((lse[:, :, rows].float() - reference).abs() <= 1e-3 + 1e-4 * reference.abs()).all())


def _extra_column_probs(q: torch.Tensor, extra_keys: torch.Tensor, columns: torch.Tensor, heads: int, lse: torch.Tensor,
                        exact: bool = False) -> torch.Tensor:
    """Seg4Diff's map beside the fused kernels: per image query, the head-averaged probability on
    `columns` of the extra keys under a softmax over [image keys; extra keys], from the image keys'
    row log-sum-exp `lse` [B, H, N] (fused_attention.row_logsumexp). q [B, N, H*d], extra_keys
    [B, M, H*d]; the extra keys are few (the prompt and concept tokens): one head's [B, N, M] float32
    scores at a time. `lse` may cover more keys than the image's (the recorder passes the model's own
    normaliser over prompt and image keys, and only the concept keys as extra). `exact`: no TF32 in
    the products (the recorder's exact precision). -> [B, N, len(columns)] float32."""
    qh, eh = split_heads(q, heads), split_heads(extra_keys, heads)
    qh = qh * qh.shape[-1] ** -0.5
    total = None
    with float32_matmul(exact=exact):
        for h in range(heads):
            scores = torch.matmul(qh[:, h], eh[:, h].transpose(1, 2))  # [B, N, M]
            joint = torch.logaddexp(lse[:, h, :, None], scores.logsumexp(dim=-1, keepdim=True))
            probs = torch.exp(scores[..., columns] - joint)
            total = probs if total is None else total.add_(probs)
            del scores, joint
    return total.div_(heads)


def image_and_extra_key_columns(
    q: torch.Tensor,
    k: torch.Tensor,
    extra_keys: torch.Tensor,
    extra_columns: torch.Tensor,
    heads: int,
    max_chunk_bytes: Optional[int] = None,
    precision: str = "exact",
    interrupt: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """Seg4Diff's map where A_II is not wanted: per image query, the head-averaged probability on
    `extra_columns` of the extra keys under a softmax over [image keys k; extra keys] -> [B, N, C].
    "fast" with the Triton kernels: the image keys' row log-sum-exp, then the few extra keys' scores
    head by head (no per-head N x N probabilities); otherwise `key_column_attention` in chunks."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got '{precision}'")
    fused = fused_kernels(q.device) if precision == "fast" else None
    columns = extra_columns.to(q.device)
    if fused is not None:
        try:
            lse = fused.row_logsumexp(q, k, heads)
        except Exception as error:  # noqa: BLE001
            _fused_failed(fused, error)
        else:
            return _extra_column_probs(q, extra_keys, columns, heads, lse)
    keys = torch.cat([k, extra_keys], 1)
    return key_column_attention(q, keys, columns + k.shape[1], heads, max_chunk_bytes, interrupt)


def query_key_attention(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Head-averaged softmax(q k^T / sqrt(d)) over all given keys: [B, Lq, H*d] x [B, Lk, H*d] -> [B, Lq, Lk].

    For few queries (concept tokens): A_CI of eq. 5 is this with the image keys.
    """
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5
    return scores.softmax(dim=-1).mean(dim=1)


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head attention in float32, heads concatenated: [B, Lq, H*d]."""
    qh, kh, vh = (split_heads(t, heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def key_column_attention(
    q: torch.Tensor, k: torch.Tensor, columns: torch.Tensor, heads: int, max_chunk_bytes: Optional[int] = None,
    interrupt: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """Head-averaged attention probabilities of every query on selected key columns.

    softmax over ALL keys of k, then only `columns` are kept: [B, Lq, len(columns)].  Head by head,
    in chunks of query rows (`max_chunk_bytes` of one head's scores, as `image_self_attention`: a
    few rows of all heads at once make matrix products too small to run at BLAS speed).  Seg4Diff's
    image-query -> text-key map on a layer without A_II. `interrupt()` runs after each head's chunk.
    """
    check = interrupt if interrupt is not None else _no_check
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    b, _, lq, d = qh.shape
    qh = (qh * d**-0.5).contiguous()
    kh = kh.contiguous()
    columns = columns.to(q.device)
    out = torch.zeros(b, lq, columns.numel(), dtype=torch.float32, device=q.device)
    rows = _rows_per_chunk(1, kh.shape[2], max_chunk_bytes, q.device)
    with float32_matmul(exact=True):
        for i in range(b):
            for start in range(0, lq, rows):
                stop = min(start + rows, lq)
                total = out[i, start:stop]
                for h in range(heads):
                    probs = torch.mm(qh[i, h, start:stop], kh[i, h].T).softmax(dim=-1)
                    total += probs[:, columns]
                    del probs
                    check()
                total.div_(heads)
    return out


def group_mean(x: torch.Tensor, groups: torch.Tensor, num_groups: int, dim: int) -> torch.Tensor:
    """Mean of the slices of `x` along `dim` that share a group id (a concept's tokens)."""
    groups = groups.to(x.device)
    counts = torch.bincount(groups, minlength=num_groups)
    if bool((counts == 0).any()):
        raise ValueError("every concept needs at least one token")
    moved = x.movedim(dim, 0)
    sums = torch.zeros((num_groups,) + moved.shape[1:], dtype=x.dtype, device=x.device).index_add_(0, groups, moved)
    shape = (num_groups,) + (1,) * (moved.dim() - 1)
    return (sums / counts.view(shape).to(x.dtype)).movedim(0, dim)


def mean_over_layers(per_layer: torch.Tensor, layers: Optional[Sequence[int]] = None, dim: int = 0) -> torch.Tensor:
    """Average of per-layer maps along `dim`, over `layers` (indices into that dim) or all."""
    if layers is not None:
        layers = list(layers)
        if not layers:
            raise ValueError("no layers selected")
        count = per_layer.shape[dim]
        bad = [layer for layer in layers if not 0 <= layer < count]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range: {count} layers were recorded (0..{count - 1})")
        per_layer = per_layer.index_select(dim, torch.tensor(layers, device=per_layer.device))
    return per_layer.mean(dim=dim)
