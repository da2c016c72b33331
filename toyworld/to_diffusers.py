"""ComfyUI MMDiT weights -> diffusers' SD3Transformer2DModel: one set of weights, two implementations.

    model = load_toy_diffusers()              # the toy SD3 (weights/toy_sd3.safetensors) in diffusers
    maps = ToyDiffusers().look(latent, caption, concepts, record_at=0.85, graph_layers=(1, 2))

The single converter of the project: the tests' random-weight tiny models (tests/fixtures/tiny_sd3.py)
and the quality benchmark's diffusers path (benchmarks/bench_quality.py) both use it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from anchordiff_core.anchors import PATCH_SIZE

from .comfy_env import import_comfy
from .text import encode_prompt, tokenizer

WEIGHTS = Path(__file__).resolve().parent / "weights"
HEAD_DIM = 64
TEXT_DIM, POOLED_DIM, LATENT_CHANNELS = 4096, 2048, 16


def diffusers_config(depth: int, heads: int, pos_embed_max_size: int, dual_attention_layers: Sequence[int] = (),
                     qk_norm: str | None = None) -> dict:
    """SD3Transformer2DModel config (diffusers 0.42.1) for ComfyUI's MMDiT with these settings
    (hidden = 64 x heads, SD3's 4096-wide context and 2048-wide pooled inputs)."""
    if qk_norm not in (None, "rms"):
        raise ValueError(f"qk_norm must be None or 'rms'; got {qk_norm!r}")
    return dict(
        sample_size=128, patch_size=PATCH_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
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


def build_diffusers(config: dict, comfy_sd: dict[str, torch.Tensor]):
    """diffusers SD3Transformer2DModel (`config` from `diffusers_config`) holding exactly the weights of
    the ComfyUI state dict, float32, eval mode."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**config)
    sd = to_diffusers_state_dict(comfy_sd, config["num_layers"])
    model.load_state_dict(sd, strict=True)  # every diffusers tensor must come from ComfyUI's
    return model.float().eval()


def load_toy_diffusers(weights: Path = WEIGHTS):
    """The trained toy SD3 (`weights/toy_sd3.safetensors`, its config in `toy_sd3.json`) as a diffusers model."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(weights) / "toy_sd3.json").read_text())
    config = diffusers_config(cfg["depth"], cfg["heads"], cfg["pos_embed_max_size"], qk_norm=cfg["qk_norm"])
    sd = load_file(str(Path(weights) / "toy_sd3.safetensors"))
    return build_diffusers(config, {k: v.float() for k, v in sd.items()})


# --- the toy through diffusers: AnchorDiff's standalone capture (anchordiff_core.diffusers_sd3) -----------
SD3_VAE_SHIFT, SD3_VAE_SCALE = 0.0609, 1.5305  # SD3's AutoencoderKL config: the pipeline feeds (latent - shift) * scale
SD3_FLOW_SHIFT = 3.0                           # SD3's FlowMatchEulerDiscreteScheduler shift


def flow_sigma(fraction: float, shift: float = SD3_FLOW_SHIFT) -> float:
    """Noise level at `fraction` of the trajectory (0 = pure noise, 1 = clean): the scheduler's shifted
    sigma = shift t / (1 + (shift - 1) t) at t = 1 - fraction."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1); got {fraction}")
    t = 1.0 - fraction
    return shift * t / (1.0 + (shift - 1.0) * t)


class ToyDiffusers:
    """The toy SD3 as diffusers' SD3Transformer2DModel, recorded by DiffusersSD3Recorder: the same
    measurement as AnchorDiff Look At Image (toyworld.comfy_run.ToyComfy.look) without ComfyUI's model code.
    Text from toyworld.text (prompt_embeds / pooled_prompt_embeds); noise drawn as ComfyUI draws it
    (torch.randn with a generator seeded by `seed`)."""

    def __init__(self, weights: Path = WEIGHTS):
        self.model = load_toy_diffusers(weights)
        self.ids = tokenizer()

    def look(self, latent: torch.Tensor, caption: str, concepts, record_at: float, graph_layers: Sequence[int],
             seg4diff_layer: int | None = None, seed: int = 0):
        """`latent`: the VAE's latent [1, 16, h, w] (before SD3's shift and scale); `concepts`: a ConceptSet
        (anchordiff_core.concepts) encoded with the toy's text encoder. Returns AttentionMaps."""
        from anchordiff_core.diffusers_sd3 import DiffusersSD3Recorder

        context, pooled = encode_prompt(caption, self.ids)
        noise = torch.randn(latent.shape, dtype=latent.dtype, generator=torch.Generator().manual_seed(seed))
        sigma = flow_sigma(record_at)
        x = sigma * noise + (1.0 - sigma) * (latent - SD3_VAE_SHIFT) * SD3_VAE_SCALE
        recorder = DiffusersSD3Recorder(self.model, concepts, graph_layers, seg4diff_layer)
        return recorder.record(x, torch.tensor([sigma * 1000.0]), context, pooled)
