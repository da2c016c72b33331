"""Concept text -> ConceptSet with the backbone's own text encoders (ComfyUI CLIP object).

Which backbone the CLIP belongs to is read from its tokenizer's streams; the adapter of that
family (nodes/models) knows where the concepts' tokens sit and what the model embeds."""
from __future__ import annotations

import torch

from ..anchordiff_core.concepts import ConceptSet, parse_concepts
from .errors import AnchorDiffError
from .models import ADAPTERS, supported_families


def encode_concepts(clip, text: str) -> ConceptSet:
    """Encode "cat, dog" as the backbone encodes a prompt; keep each concept's token positions.

    The concepts are joined into one string and encoded once; each concept's own tokens are then
    found in that string (tokenised by ourselves, since word ids are unreliable), so a concept
    made of several tokens keeps them all.
    """
    try:
        names = parse_concepts(text)
    except (TypeError, ValueError) as error:
        raise AnchorDiffError(str(error)) from None
    if clip is None:
        raise AnchorDiffError(
            "No CLIP connected: connect the model's text encoders (SD3: TripleCLIPLoader or an SD3 checkpoint's CLIP; "
            "Flux.1: DualCLIPLoader with clip_l and t5xxl, type flux; Flux.2: CLIPLoader with its text encoder (dev: Mistral Small 3.1; Klein: Qwen3 4B / 8B), type flux2; Chroma: CLIPLoader with t5xxl, type chroma; Qwen-Image: CLIPLoader with qwen_2.5_vl_7b, type qwen_image)."
        )
    probe = clip.tokenize("a")
    for adapter in ADAPTERS:
        if adapter.accepts_tokens(probe):
            return _finite(adapter.encode_concepts(clip, names))
    keys = ", ".join(sorted(probe)) if isinstance(probe, dict) else type(probe).__name__
    raise AnchorDiffError(
        f"The connected CLIP is not the text encoder of a supported family (it has encoders: {keys}). Connect the text "
        f"encoders of one of: {supported_families()} (SD3: TripleCLIPLoader with clip_g, clip_l, t5xxl, or an SD3 / SD3.5 "
        "checkpoint's CLIP; Flux.1: DualCLIPLoader with clip_l and t5xxl, type flux; Chroma: CLIPLoader with t5xxl, "
        "type chroma; Flux.2: CLIPLoader with its text encoder (dev: Mistral Small 3.1; Klein: Qwen3 4B / 8B), type flux2; "
        "Qwen-Image: CLIPLoader with qwen_2.5_vl_7b, type qwen_image)."
    )


def _finite(concepts: ConceptSet) -> ConceptSet:
    """The encoded concepts, or a clear error for one whose features are NaN or infinite."""
    for k, name in enumerate(concepts.names):
        if not bool(torch.isfinite(concepts.embeddings[concepts.token_concept == k]).all()):
            raise AnchorDiffError(
                f"Concept '{name}' encodes to NaN or infinite values: its weight in ComfyUI's (text:weight) syntax must be a "
                "moderate finite number, e.g. (cat:1.2); or write the concept without the parentheses."
            )
    return concepts
