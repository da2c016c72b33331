"""Concept text -> ConceptSet with SD3's own text encoders (ComfyUI CLIP object)."""
from __future__ import annotations

import torch

from ..anchordiff_core.concepts import ConceptSet, join_concepts, locate_tokens, parse_concepts
from .sd3_patch import AnchorDiffError

CLIP_SPECIAL = {49406, 49407}  # start / end-and-padding tokens of CLIP-L
SD3_CONTEXT_WIDTH = 4096


def _clip_l_ids(tokens: dict) -> list[list[int]]:
    return [[int(t[0]) for t in chunk] for chunk in tokens["l"]]


def encode_concepts(clip, text: str) -> ConceptSet:
    """Encode "cat, dog" as SD3 encodes a prompt; keep each concept's CLIP token positions.

    The concepts are joined into one string and encoded once; each concept's own tokens are then
    found in that string (tokenised by ourselves, since word ids are unreliable), so a concept
    made of several tokens keeps them all.
    """
    try:
        names = parse_concepts(text)
    except (TypeError, ValueError) as error:
        raise AnchorDiffError(str(error)) from None
    if clip is None:
        raise AnchorDiffError("No CLIP connected: connect SD3's text encoders (TripleCLIPLoader, or an SD3 checkpoint's CLIP).")
    tokens = clip.tokenize(join_concepts(names))
    if not isinstance(tokens, dict) or "l" not in tokens or "g" not in tokens:
        keys = ", ".join(sorted(tokens)) if isinstance(tokens, dict) else type(tokens).__name__
        raise AnchorDiffError(
            f"The connected CLIP is not SD3's (it has encoders: {keys}). Connect SD3's text encoders: "
            "TripleCLIPLoader (clip_g, clip_l, t5xxl) or the CLIP output of an SD3 / SD3.5 checkpoint."
        )
    chunks = _clip_l_ids(tokens)
    if len(chunks) > 1:
        used = sum(1 for chunk in chunks for i in chunk if i not in CLIP_SPECIAL)
        given = f"{len(names)} concept{'s' if len(names) != 1 else ''}"
        raise AnchorDiffError(
            f"The concepts are too long for one CLIP window (75 tokens): {given} given, {used} tokens with the separators. "
            "Use fewer or shorter concepts."
        )
    pieces = [[i for i in _clip_l_ids(clip.tokenize(name))[0] if i not in CLIP_SPECIAL] for name in names]
    try:
        positions = locate_tokens(chunks[0], pieces, names)
    except ValueError as error:
        raise AnchorDiffError(str(error)) from None
    cond, _pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    if cond.dim() != 3 or cond.shape[-1] != SD3_CONTEXT_WIDTH:
        raise AnchorDiffError(f"The text encoder output has shape {tuple(cond.shape)}; SD3 expects [1, L, {SD3_CONTEXT_WIDTH}].")
    for name, concept in zip(names, positions):
        if not bool(torch.isfinite(cond[0, concept]).all()):
            raise AnchorDiffError(
                f"Concept '{name}' encodes to NaN or infinite values: its weight in ComfyUI's (text:weight) syntax must be a "
                "moderate finite number, e.g. (cat:1.2); or write the concept without the parentheses."
            )
    flat = [p for concept in positions for p in concept]
    owner = [k for k, concept in enumerate(positions) for _ in concept]
    return ConceptSet(tuple(names), cond[0, flat].detach().float().cpu(), torch.tensor(owner, dtype=torch.long))
