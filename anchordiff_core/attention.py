"""Attention maps recomputed from per-head q, k, v, in chunks: no [heads, N, N] tensor is ever built.

Layout follows ComfyUI's attention calls: q, k, v are [B, L, heads * head_dim].  Everything is
computed in float32 whatever the model's dtype, on the device of the inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F



def default_chunk_bytes(device: torch.device) -> int:
    """Bytes of attention scores per chunk: small on CPUs, so each chunk's softmax and reductions
    stay in cache (8 MB measured fastest at 4096 tokens on 2 cores, 1.7x over 64 MB); large on
    accelerators, where bigger batched matmuls win and memory is the only limit."""
    return 8 * 2**20 if torch.device(device).type == "cpu" else 64 * 2**20


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*d] -> [B, H, L, d] float32."""
    b, length, dim = x.shape
    if dim % heads:
        raise ValueError(f"feature size {dim} is not divisible by {heads} heads")
    return x.float().view(b, length, heads, dim // heads).transpose(1, 2)


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
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A_II and O_II of the paper (eqs. 3-4) from image-token q, k, v [B, N, H*d].

    A = mean over heads of softmax(q_h k_h^T / sqrt(d)) with the softmax over image keys only
    -> [B, N, N];  O = A_h v_h per head, heads concatenated -> [B, N, H*d].
    `out_a` / `out_o` (float32, on q's device) receive the results chunk by chunk, so a result
    never exists twice.

    With `extra_keys` [B, M, H*d] it also returns, per image query, the head-averaged probability
    on `extra_columns` (indices into the extra keys) of a softmax over [image keys; extra keys]
    -> [B, N, len(extra_columns)]: Seg4Diff's map, read from the same image scores.
    """
    qh, kh, vh = (split_heads(t, heads) for t in (q, k, v))
    b, _, n, d = qh.shape
    qh = qh * d**-0.5  # scale the small queries, not the big scores
    a_mean = torch.empty(b, n, n, dtype=torch.float32, device=q.device) if out_a is None else out_a
    out = torch.empty(b, n, heads * d, dtype=torch.float32, device=q.device) if out_o is None else out_o
    if a_mean.shape != (b, n, n) or out.shape != (b, n, heads * d):
        raise ValueError("out_a / out_o have the wrong shape")
    extra = None
    if extra_keys is not None:
        eh = split_heads(extra_keys, heads)
        columns = extra_columns.to(q.device)
        extra = torch.empty(b, n, columns.numel(), dtype=torch.float32, device=q.device)
    rows = _rows_per_chunk(heads, n, max_chunk_bytes, q.device)
    for i in range(b):
        keys_t = kh[i].transpose(1, 2)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            scores = torch.matmul(qh[i, :, start:stop], keys_t)  # [H, c, N]
            if extra is not None:
                extra_scores = torch.matmul(qh[i, :, start:stop], eh[i].transpose(1, 2))  # [H, c, M]
                joint = torch.logaddexp(scores.logsumexp(dim=-1, keepdim=True), extra_scores.logsumexp(dim=-1, keepdim=True))
                extra[i, start:stop] = torch.exp(extra_scores[..., columns] - joint).mean(dim=0)
            probs = scores.softmax(dim=-1)  # fused, row by row: chunk rows stay in cache
            del scores
            a_mean[i, start:stop] = probs.mean(dim=0)
            out[i, start:stop] = torch.matmul(probs, vh[i]).transpose(0, 1).reshape(stop - start, heads * d)
            del probs
    return a_mean, out, extra


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
    q: torch.Tensor, k: torch.Tensor, columns: torch.Tensor, heads: int, max_chunk_bytes: Optional[int] = None
) -> torch.Tensor:
    """Head-averaged attention probabilities of every query on selected key columns.

    softmax over ALL keys of k, then only `columns` are kept: [B, Lq, len(columns)].  Chunked
    over queries (Seg4Diff's image-query -> text-key map).
    """
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    b, _, lq, d = qh.shape
    columns = columns.to(q.device)
    out = torch.empty(b, lq, columns.numel(), dtype=torch.float32, device=q.device)
    rows = _rows_per_chunk(heads, kh.shape[2], max_chunk_bytes, q.device)
    for i in range(b):
        keys_t = kh[i].transpose(1, 2)
        for start in range(0, lq, rows):
            stop = min(start + rows, lq)
            probs = torch.matmul(qh[i, :, start:stop] * d**-0.5, keys_t).softmax(dim=-1)
            out[i, start:stop] = probs[:, :, columns].mean(dim=0)
            del probs
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
