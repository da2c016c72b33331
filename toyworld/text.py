"""The toy model's text side: a deterministic stand-in for SD3's CLIP-L + CLIP-G, no weights.

Real CLIP/T5 weights cannot be had here, and a text encoder trained from scratch would be a second
unknown. Each token id maps to a fixed pseudo-random N(0, 1) vector per stream, seeded by
(stream, id) (`token_vector`); the output has SD3's layout: [L, 4096] with CLIP-L 768 + CLIP-G 1280
features zero-padded to 4096, pooled [2048].

`context=True` (the toy model's encoder) adds, like a causal text encoder, a trace of the previous
token: out[i] = v(tok[i]) + CONTEXT_WEIGHT * v'(tok[i-1]). Without it every token is
context-free and the model sees a bag of words: "a red circle and a blue square" and "a blue circle
and a red square" would encode alike and colours could not be bound to shapes. With it the noun
carries its adjective, as CLIP's causal output does.

Used by the toy's ComfyUI CLIP (toyworld/comfy_clip.py, also the test node pack's fixture CLIP),
so the Concepts node encodes concepts through exactly the path the model was trained with.
"""
from __future__ import annotations

import functools
import zlib

import torch

CLIP_L_DIM, CLIP_G_DIM, TEXT_DIM, POOLED_DIM = 768, 1280, 4096, 2048
CLIP_END_TOKEN = 49407
CONTEXT_WEIGHT = 0.5


@functools.lru_cache(maxsize=65536)
def token_vector(stream: str, token_id: int, dim: int) -> torch.Tensor:
    """Fixed N(0, 1) vector for one token of one stream ("l", "g", "t5xxl", "pooled_l", ...)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{stream}:{token_id}".encode()))
    return torch.randn(dim, generator=g)


def encode_stream(stream: str, ids: list[int], weights: list[float], dim: int, context: bool) -> torch.Tensor:
    """[len(ids), dim]: each token's vector times its weight, plus the previous token's trace."""
    rows = torch.stack([token_vector(stream, i, dim) for i in ids]) * torch.tensor(weights)[:, None]
    if context and len(ids) > 1:
        prev = torch.stack([token_vector(stream + "_prev", i, dim) for i in ids[:-1]])
        rows[1:] += CONTEXT_WEIGHT * prev
    return rows


def pooled_vector(l_ids: list[int], g_ids: list[int]) -> torch.Tensor:
    """[2048]: mean over the first chunk's tokens up to the first end token, per stream."""
    def mean(stream, ids, dim):
        kept = []
        for i in ids:
            kept.append(i)
            if i == CLIP_END_TOKEN:
                break
        return torch.stack([token_vector(stream, i, dim) for i in kept]).mean(0)
    return torch.cat([mean("pooled_l", l_ids, CLIP_L_DIM), mean("pooled_g", g_ids, CLIP_G_DIM)])


def encode_lg(l_ids: list[int], g_ids: list[int], l_weights=None, g_weights=None,
              context: bool = True) -> torch.Tensor:
    """SD3's CLIP part of the conditioning for one prompt: [min(len), 4096]."""
    l_weights = l_weights if l_weights is not None else [1.0] * len(l_ids)
    g_weights = g_weights if g_weights is not None else [1.0] * len(g_ids)
    l = encode_stream("l", l_ids, l_weights, CLIP_L_DIM, context)
    g = encode_stream("g", g_ids, g_weights, CLIP_G_DIM, context)
    n = min(len(l), len(g))  # as SD3ClipModel: cut to the shorter stream
    return torch.nn.functional.pad(torch.cat([l[:n], g[:n]], -1), (0, TEXT_DIM - CLIP_L_DIM - CLIP_G_DIM))


def tokenizer():
    """text -> (CLIP-L ids, CLIP-G ids) of the first 77-token chunk, by ComfyUI's SD3Tokenizer (CLIP's BPE
    vocabulary, padded to 77 as SD3 pads): the token ids the toy was trained on."""
    from .comfy_env import import_comfy
    import_comfy()
    from comfy.text_encoders.sd3_clip import SD3Tokenizer
    tok = SD3Tokenizer()

    def ids(text: str) -> tuple[list[int], list[int]]:
        r = tok.tokenize_with_weights(text)
        return [i[0] for i in r["l"][0]], [i[0] for i in r["g"][0]]
    return ids


def encode_prompt(text: str, ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The toy model's conditioning for a prompt, without ComfyUI's CLIP object: (context [1, 77, 4096],
    pooled [1, 2048]), diffusers' `prompt_embeds` / `pooled_prompt_embeds`. Equal to what CLIPTextEncode
    gives with the fixture CLIP (`context=True`). `ids`: a `tokenizer()` to reuse."""
    l_ids, g_ids = (ids or tokenizer())(text)
    return encode_lg(l_ids, g_ids, context=True)[None], pooled_vector(l_ids, g_ids)[None]
