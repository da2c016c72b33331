"""ComfyUI MMDiT weights -> diffusers' SD3Transformer2DModel: one set of weights, two implementations.

    model = load_toy_diffusers()              # the toy SD3 (weights/toy_sd3.safetensors) in diffusers

The single converter of the project: the tests' random-weight tiny models (tests/fixtures/tiny_sd3.py)
and the quality benchmark's diffusers path (benchmarks/bench_quality.py) both use it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from .comfy_import import import_comfy

WEIGHTS = Path(__file__).resolve().parent / "weights"
HEAD_DIM = 64
TEXT_DIM, POOLED_DIM, LATENT_CHANNELS, PATCH = 4096, 2048, 16, 2


def diffusers_config(depth: int, heads: int, pos_embed_max_size: int, dual_attention_layers: Sequence[int] = (),
                     qk_norm: str | None = None) -> dict:
    """SD3Transformer2DModel config (diffusers 0.42.1) for ComfyUI's MMDiT with these settings
    (hidden = 64 x heads, SD3's 4096-wide context and 2048-wide pooled inputs)."""
    if qk_norm not in (None, "rms"):
        raise ValueError(f"qk_norm must be None or 'rms'; got {qk_norm!r}")
    return dict(
        sample_size=128, patch_size=PATCH, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=depth, attention_head_dim=HEAD_DIM, num_attention_heads=heads,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=HEAD_DIM * heads, pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=pos_embed_max_size, dual_attention_layers=tuple(dual_attention_layers),
        qk_norm="rms_norm" if qk_norm == "rms" else None,
    )


def to_diffusers_state_dict(comfy_sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Invert ComfyUI's own diffusers->ComfyUI key map (comfy.utils.mmdit_to_diffusers).

    Map values are either a ComfyUI key, or (key, (dim, start, length)) for a slice of a
    fused qkv tensor, or (key, None, fn) where fn = swap_scale_shift (its own inverse:
    diffusers orders AdaLayerNormContinuous as scale, shift; ComfyUI as shift, scale)."""
    import_comfy()
    import comfy.utils

    key_map = comfy.utils.mmdit_to_diffusers({"depth": depth})
    out, used = {}, set()
    for dkey, target in key_map.items():
        if isinstance(target, str):
            ckey, src = target, None
        else:
            ckey, src = target[0], target[1:]
        if ckey not in comfy_sd:
            continue  # e.g. attn2 keys of non-MMDiT-X blocks, ln_q without qk-norm
        w = comfy_sd[ckey]
        if src and src[0] is not None:
            dim, start, length = src[0]
            w = w.narrow(dim, start, length)
        if src and len(src) > 1:
            w = src[1](w)
        out[dkey] = w.contiguous().clone()
        used.add(ckey)
    missing = set(comfy_sd) - used
    if missing:
        raise KeyError(f"ComfyUI keys with no diffusers counterpart: {sorted(missing)}")
    return out


def build_diffusers(config: dict, comfy_sd: dict[str, torch.Tensor], dtype=torch.float32):
    """diffusers SD3Transformer2DModel (`config` from `diffusers_config`) holding exactly the weights of
    the ComfyUI state dict, in `dtype`, eval mode."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**config)
    sd = to_diffusers_state_dict(comfy_sd, config["num_layers"])
    model.load_state_dict(sd, strict=True)  # every diffusers tensor must come from ComfyUI's
    return model.to(dtype).eval()


def load_toy_diffusers(weights: Path = WEIGHTS, dtype=torch.float32):
    """The trained toy SD3 (`weights/toy_sd3.safetensors`, its config in `toy_sd3.json`) as a diffusers model."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(weights) / "toy_sd3.json").read_text())
    config = diffusers_config(cfg["depth"], cfg["heads"], cfg["pos_embed_max_size"], qk_norm=cfg["qk_norm"])
    sd = load_file(str(Path(weights) / "toy_sd3.safetensors"))
    return build_diffusers(config, {k: v.float() for k, v in sd.items()}, dtype)
