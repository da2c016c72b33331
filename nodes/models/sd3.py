"""SD3 / SD3.5 (ComfyUI's MMDiT, comfy/ldm/modules/diffusionmodules/mmdit.py).

Layout: `joint_blocks[i]` = (context_block, x_block); the joint attention concatenates text FIRST,
then image; the last block is pre_only (no context output). SD3.5 Medium's MMDiT-X blocks run a
second, image-only attention after the joint one. Block replace key ("double_block", i).
"""
from __future__ import annotations

import torch

import comfy.model_management
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

from ...anchordiff_core.concepts import ConceptSet, join_concepts, locate_tokens
from ..errors import AnchorDiffError
from .base import BackboneAdapter, image_rows_lse

CLIP_SPECIAL = {49406, 49407}  # start / end-and-padding tokens of CLIP-L
SD3_CONTEXT_WIDTH = 4096


def _clip_l_ids(tokens: dict) -> list[list[int]]:
    return [[int(t[0]) for t in chunk] for chunk in tokens["l"]]


class SD3Adapter(BackboneAdapter):
    family = "SD3 / SD3.5 (Medium, Large, Large Turbo)"

    @classmethod
    def matches(cls, diffusion_model) -> bool:
        return isinstance(diffusion_model, MMDiT)

    # ------------------------------------------------------------------ names and layout
    def variant(self) -> str:
        dm = self.dm
        depth = len(dm.joint_blocks)
        qk_norm = not isinstance(dm.joint_blocks[0].x_block.attn.ln_q, torch.nn.Identity)
        mmditx = bool(dm.x_block_self_attn_layers)
        if depth == 24 and mmditx:
            return "SD3.5 Medium"
        if depth == 24 and not qk_norm:
            return "SD3 Medium"
        if depth == 38:
            return "SD3.5 Large"
        return f"SD3-architecture model with {depth} blocks"

    def num_blocks(self) -> int:
        return len(self.dm.joint_blocks)

    def heads(self) -> int:
        return self.dm.joint_blocks[0].x_block.attn.num_heads

    def width(self) -> int:
        return self.dm.joint_blocks[0].x_block.attn.qkv.in_features

    def context_width(self) -> int:
        embedder = self.dm.context_embedder
        return embedder.in_features if hasattr(embedder, "in_features") else 4096

    def block_keys(self) -> list[tuple[str, int]]:
        return [("double_block", i) for i in range(self.num_blocks())]

    def original_block(self, index: int, extra: dict):
        block, dm = self.dm.joint_blocks[index], self.dm

        def original(args):
            # as MMDiT's own loop calls an unpatched block; ComfyUI's `original_block` would wrap
            # it in torch.utils.checkpoint, whose first use costs ~1 s of imports (sympy, dynamo)
            txt, img = block(args["txt"], args["img"], c=args["vec"], use_checkpoint=dm.use_checkpoint,
                             transformer_options=args["transformer_options"])
            return {"txt": txt, "img": img}

        return original

    # ------------------------------------------------------------------ recording
    def initial_concepts(self, embeddings, dtype, device, batch: int) -> torch.Tensor:
        """Concept tokens through the model's context embedding, like the prompt's tokens."""
        context = embeddings.to(device=device, dtype=dtype)[None]
        if self.dm.context_processor is not None:
            context = self.dm.context_processor(context)
        context = self.dm.context_embedder(context)
        return context.expand(batch, -1, -1).contiguous()

    def record_block(self, call, index: int, args: dict, captured: tuple) -> str:
        img, txt, vec = args["img"], args["txt"], args["vec"]
        q, k, v, out = (t.reshape(t.shape[0], t.shape[1], -1) for t in captured[:4])  # mmdit keeps v as [B, L, H, d]
        text_len, n = (txt.shape[1] if txt is not None else 0), img.shape[1]
        if q.shape[1] != text_len + n:
            return f"unexpected joint attention length {q.shape[1]} at block {index} (text {text_len} + image {n})"
        rows = call.rows
        block = self.dm.joint_blocks[index].context_block
        if call.concept_state is None:
            call.concept_state = self.initial_concepts(call.concepts.embeddings, img.dtype, img.device, rows.numel())
        (q_c, k_c, v_c), intermediates = block.pre_attention(call.concept_state, vec[rows])
        v_c = v_c.reshape(v_c.shape[0], v_c.shape[1], -1)
        o_c = call.step.record_block(
            index,
            q[rows, text_len:], k[rows, text_len:], v[rows, text_len:],
            out[rows, text_len:], k[rows, :text_len],
            q_c, k_c, v_c, image_rows_lse(captured[4], rows, text_len, n, q.shape[1]),
        )
        if not block.pre_only:
            call.concept_state = block.post_attention(o_c.to(img.dtype), *intermediates)
        comfy.model_management.throw_exception_if_processing_interrupted()
        return ""

    # ------------------------------------------------------------------ concepts
    @classmethod
    def accepts_tokens(cls, tokens) -> bool:
        return isinstance(tokens, dict) and "l" in tokens and "g" in tokens

    @classmethod
    def encode_concepts(cls, clip, names: list[str]) -> ConceptSet:
        """As SD3 encodes a prompt: CLIP-L + CLIP-G features (zero-padded to 4096) at the concepts'
        CLIP-L token positions of the joined concept string."""
        tokens = clip.tokenize(join_concepts(names))
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
        flat = [p for concept in positions for p in concept]
        owner = [k for k, concept in enumerate(positions) for _ in concept]
        return ConceptSet(tuple(names), cond[0, flat].detach().float().cpu(), torch.tensor(owner, dtype=torch.long), cls.family)

    # ------------------------------------------------------------------ defaults
    def default_graph_layers(self) -> tuple[int, ...]:
        """The paper's pairs; see docs/DESIGN.md for SD3.5 Medium and other depths."""
        variant, last = self.variant(), self.num_blocks() - 1
        if variant == "SD3 Medium":
            return (9, 18)
        if variant == "SD3.5 Large":
            return (23, 31)  # Tables 5 and 7; the implementation paragraph's {10, 23} contradicts them
        if variant == "SD3.5 Medium":
            return (14, 19)  # depth-relative position of SD3.5 Large's pair; not validated on data
        return tuple(sorted({round(9 / 23 * last), round(18 / 23 * last)}))

    def default_seg4diff_layer(self) -> int:
        """Seg4Diff's SD3 Medium expert layer 9, placed at the same relative depth elsewhere."""
        return round(9 / 23 * (self.num_blocks() - 1))
