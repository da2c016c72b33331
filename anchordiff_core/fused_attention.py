"""Head-mean image attention A = (1/H) sum_h softmax(q_h k_h^T / sqrt(d)) as two Triton kernels, for
the recorder's `fast` precision on CUDA: no per-head N x N scores ever reach memory.

1. `row_logsumexp`: per head and query row, the log-sum-exp of the scaled scores over all keys
   (online max and sum over key tiles, flash-attention style): [B, H, N] float32.
2. `head_mean_probs`: per output tile (query rows x key columns), for each head in turn, the
   scores' tile recomputed on chip, exp(score - lse) accumulated in float32; the tile written once,
   divided by H, in the output's dtype.

Products: fp16 tiles on fp16 tensor cores, float32 tiles in TF32 on CUDA (as `fast` allows), both
with float32 accumulation.  bf16 tiles are widened to float32 first (exact) and so also run in TF32,
whose 10-bit mantissa holds bf16's 8 bits: the products stay exact.  This costs half the bf16
tensor-core rate on those products (counted in benchmarks/gpu_estimate.py), and it is what lets the
CPU test cover the shipped code: triton 3.9's interpreter returns garbage from tl.dot on bf16
tiles (values ~1e10 for unit inputs), while its float32 and fp16 dots are right.  Softmax and head
sum are float32.  This module imports
triton at the top: `attention.fused_kernels()` imports it only when wanted.  With the environment
variable TRITON_INTERPRET=1 set before this module is first imported, triton's interpreter runs the
same kernels on CPU tensors (slowly): that is how tests/test_fused_attention.py checks them
against the exact float32 recorder on a machine without a GPU.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """Whether triton runs its interpreter (TRITON_INTERPRET=1): the kernels then take CPU tensors."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; before, only the environment variable
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def usable_on(device: torch.device) -> bool:
    return torch.device(device).type == "cuda" or interpreted()


# tl.reduce with triton's own combine functions, and tl.full, rather than tl.max / tl.sum / tl.zeros: those are
# @triton.jit functions of triton's standard library, compiled-only when triton was first imported
# without TRITON_INTERPRET=1, and the interpreter then cannot call them ("Cannot call @triton.jit'd
# outside of the scope of a kernel"). The combine functions themselves are never called by the
# interpreter: it recognises them and reduces with numpy (a combine function of our own is run
# element by element in Python, 400x slower: 45 s for one row_logsumexp at 256 tokens, 4 heads).
# Compiled, this is exactly what tl.max / tl.sum do. They are private names (triton 2.1 to 3.9 at
# least): should a triton lack them, combine functions of our own do the same, slowly interpreted.
@triton.jit
def _own_maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _own_add(a, b):
    return a + b


_maximum = getattr(getattr(tl, "standard", None), "_elementwise_max", None) or _own_maximum
_add = getattr(getattr(tl, "standard", None), "_sum_combine", None) or _own_add


@triton.jit
def _row_lse_kernel(Q, K, LSE, n, heads, d, scale, sqb, sqn, skb, skn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIDEN: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n
    d_ok = offs_d < d
    q = tl.load(Q + b * sqb + offs_m[:, None].to(tl.int64) * sqn + h * d + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if WIDEN:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < n
        k = tl.load(K + b * skb + offs_n[None, :].to(tl.int64) * skn + h * d + offs_d[:, None],
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if WIDEN:
            k = k.to(tl.float32)
        s = tl.dot(q, k) * scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _maximum))
        l_i = l_i * tl.exp(m_i - m_new) + tl.reduce(tl.exp(s - m_new[:, None]), 1, _add)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(LSE + (b * heads + h) * n + offs_m, lse, mask=row_ok)


@triton.jit
def _head_mean_kernel(Q, K, LSE, A, n, heads, d, scale, sqb, sqn, skb, skn, sab, sam, san,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIDEN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n
    col_ok = offs_n < n
    d_ok = offs_d < d
    q_ptrs = Q + b * sqb + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :]
    k_ptrs = K + b * skb + offs_n[None, :].to(tl.int64) * skn + offs_d[:, None]
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for h in range(heads):
        q = tl.load(q_ptrs + h * d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_ptrs + h * d, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if WIDEN:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        lse = tl.load(LSE + (b * heads + h) * n + offs_m, mask=row_ok, other=0.0)
        acc += tl.exp(tl.dot(q, k) * scale - lse[:, None])
    acc = acc / heads
    a_ptrs = A + b * sab + offs_m[:, None].to(tl.int64) * sam + offs_n[None, :].to(tl.int64) * san
    tl.store(a_ptrs, acc.to(A.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _blocks(device: torch.device, d: int) -> tuple[int, int, int]:
    """(rows, columns, head dim) of a tile: 128 x 64 on a GPU, 32 x 32 in the interpreter (fewer,
    larger numpy steps are what it needs); the head dim padded to a power of two >= 16 (tl.dot)."""
    block_d = max(16, triton.next_power_of_2(d))
    return (32, 32, block_d) if torch.device(device).type != "cuda" else (128, 64, block_d)


def _checked(q: torch.Tensor, k: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, N, heads * d]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[-1] % heads:
        raise ValueError(f"feature size {q.shape[-1]} is not divisible by {heads} heads")
    if not usable_on(q.device):
        raise ValueError("the fused kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    return q, k, q.shape[-1] // heads


def row_logsumexp(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """log sum_j exp(q_h[i] . k_h[j] / sqrt(d)) for every batch, head and query row: [B, H, N] float32."""
    q, k, d = _checked(q, k, heads)
    b, n, _ = q.shape
    lse = torch.empty(b, heads, n, dtype=torch.float32, device=q.device)
    block_m, block_n, block_d = _blocks(q.device, d)
    grid = (triton.cdiv(n, block_m), heads, b)
    _row_lse_kernel[grid](q, k, lse, n, heads, d, 1 / math.sqrt(d), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, WIDEN=q.dtype == torch.bfloat16)
    return lse


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, heads: int, lse: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(1/H) sum_h softmax(q_h k_h^T / sqrt(d)) [B, N, N], written tile by tile into `out` (any
    strides, its dtype: float32 by default; float16 / bfloat16 store the float32 sums rounded).
    `lse`: row_logsumexp(q, k, heads), computed here when not given."""
    q, k, d = _checked(q, k, heads)
    b, n, _ = q.shape
    if lse is None:
        lse = row_logsumexp(q, k, heads)
    if lse.shape != (b, heads, n) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous float32 [B, H, N] = {(b, heads, n)} tensor; got {tuple(lse.shape)} {lse.dtype}")
    if out is None:
        out = torch.empty(b, n, n, dtype=torch.float32, device=q.device)
    if out.shape != (b, n, n):
        raise ValueError(f"out must be [B, N, N] = {(b, n, n)}; got {tuple(out.shape)}")
    block_m, block_n, block_d = _blocks(q.device, d)
    grid = (triton.cdiv(n, block_m), triton.cdiv(n, block_n), b)
    _head_mean_kernel[grid](q, k, lse, out, n, heads, d, 1 / math.sqrt(d), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                            out.stride(0), out.stride(1), out.stride(2), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, WIDEN=q.dtype == torch.bfloat16)
    return out
