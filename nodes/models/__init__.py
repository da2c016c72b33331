"""Backbone adapters (one per model family) and the lookup from a ComfyUI MODEL to its adapter."""
from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention

from ..errors import AnchorDiffError
from .base import BackboneAdapter
from .chroma import ChromaAdapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .qwen_image import QwenImageAdapter
from .sd3 import SD3Adapter

ADAPTERS: tuple[type[BackboneAdapter], ...] = (SD3Adapter, FluxAdapter, Flux2Adapter, ChromaAdapter, QwenImageAdapter)


def supported_families() -> str:
    return "; ".join(adapter.family for adapter in ADAPTERS)


def adapter_for(model) -> BackboneAdapter:
    """The adapter of the diffusion model inside a ComfyUI MODEL, or a clear error naming what was
    connected and every supported family."""
    base = getattr(model, "model", None)
    diffusion_model = getattr(base, "diffusion_model", None)
    for adapter in ADAPTERS:
        if diffusion_model is not None and adapter.matches(diffusion_model):
            if not hasattr(comfy_attention, "wrap_attn"):
                raise AnchorDiffError("AnchorDiff needs ComfyUI 0.3.60 or newer (optimized_attention_override).")
            return adapter(diffusion_model)
    what = type(base).__name__ if base is not None else type(model).__name__
    inner = f" ({type(diffusion_model).__name__})" if diffusion_model is not None else ""
    why = ""
    for adapter in ADAPTERS:
        reason = adapter.unsupported_reason(diffusion_model) if diffusion_model is not None else ""
        if reason:
            why = f" {reason}"
    raise AnchorDiffError(
        f"AnchorDiff needs a model of a supported family, but the connected MODEL is {what}{inner}.{why} "
        f"Supported families: {supported_families()}. Load one with 'Load Checkpoint' or "
        "'Load Diffusion Model'."
    )
