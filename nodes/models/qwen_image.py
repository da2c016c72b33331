"""Qwen-Image and Qwen-Image Edit (ComfyUI's comfy/ldm/qwen_image/model.py).

Layout (read in ComfyUI 0.3.75 and 0.33.0):
- `transformer_blocks[i]` (QwenImageTransformerBlock): separate image and text weights (img_* / txt_*,
  attn.to_q/k/v for the image, attn.add_q/k/v_proj for the text), one joint attention over
  [text, image (+ Edit's reference-image tokens)]; replace key ("double_block", i), args img, txt,
  vec (the timestep embedding), pe. No single-stream blocks.
- q and k reach the attention call RMS-normed and RoPE-rotated, laid out [B, heads, L, head_dim]
  (`skip_reshape=True`); the output is [B, L, heads * head_dim].
- Text tokens carry RoPE positions (unlike Flux.1): the prompt's token t sits at txt_start + t on all
  three axes, txt_start = max(grid rows, grid columns) // 2 (the image grid is centred on 0).
- Latents are 5-D [B, 16, 1, h, w] (Wan 2.1's VAE): the grid comes from the last two sizes.
- Qwen-Image Edit: the reference latents' tokens follow the grid in the joint sequence; they are
  left out of every map and of the concept stream's keys (as Kontext's). ComfyUI 0.33's
  "index_timestep_zero" (Edit 2511) doubles the timestep embedding's batch (the second half, at
  timestep 0, modulates only the reference tokens); the text stream, hence the concept stream,
  uses the first half.

Concept stream (ConceptAttention's, as for SD3 and Flux.1): the concepts' Qwen2.5-VL features
through txt_norm and txt_in, then each block's text weights (txt_mod, txt_norm1, add_q/k/v_proj,
norm_added_q/k, to_add_out, txt_norm2, txt_mlp), for the concept tokens only. Concept positions
(a rule, written in docs/DESIGN.md): each concept token is rotated at txt_start + its place in the
encoded concept string, i.e. where it would sit if the concept string were the prompt.
"""
from __future__ import annotations

import torch

import comfy.model_management
from comfy.ldm.flux.math import apply_rope1
from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

from ...anchordiff_core.concepts import JOINER, ConceptSet, join_concepts, locate_tokens
from ..errors import AnchorDiffError
from .base import BackboneAdapter, RelativeDepthDefaults, flat_heads, image_rows_lse, split_image

QWEN_STREAM = "qwen25_7b"  # ComfyUI's tokenizer / encoder key for Qwen2.5-VL 7B
QWEN_IMAGE_DEPTH = 60  # Qwen-Image / Edit / Edit 2509 / 2511: 60 blocks at width 3072


def _ids(tokens: dict) -> list[int]:
    return [int(t[0]) for chunk in tokens[QWEN_STREAM] for t in chunk]


def template_positions(clip, names: list[str], ids) -> tuple[list[int], list[list[int]], int]:
    """For a text encoder that wraps the prompt in a chat template (Qwen-Image's Qwen2.5-VL, Flux.2's
    Mistral / Qwen3): the token ids of the joined concept string as a prompt, each concept's positions
    in them, and the length of the template's head. `ids(tokens)` reads one stream's ids (without any
    padding). Each concept is found in the form it has in the joined string (a BPE tokenises " car"
    and "car" differently): the template's head and tail, read off the empty prompt, are cut from
    each concept's own tokens."""
    sequence = ids(clip.tokenize(join_concepts(names)))
    empty = ids(clip.tokenize(""))
    head = next((i for i, (a, b) in enumerate(zip(sequence, empty)) if a != b), len(empty))
    tail = len(empty) - head
    pieces = []
    for k, name in enumerate(names):
        own = ids(clip.tokenize(name if k == 0 else JOINER[-1] + name))
        pieces.append(own[head:len(own) - tail])
    try:
        return sequence, locate_tokens(sequence, pieces, names), head
    except ValueError as error:
        raise AnchorDiffError(str(error)) from None


class QwenImageAdapter(RelativeDepthDefaults, BackboneAdapter):
    """Default layers: RelativeDepthDefaults (Qwen-Image's 60 blocks: graph 23, 46; Seg4Diff 23). Unmeasured
    on real weights."""

    family = "Qwen-Image (and Edit)"

    @classmethod
    def matches(cls, diffusion_model) -> bool:
        return (isinstance(diffusion_model, QwenImageTransformer2DModel) and diffusion_model.patch_size == 2
                and not getattr(getattr(diffusion_model, "time_text_embed", None), "use_additional_t_cond", False))

    @classmethod
    def unsupported_reason(cls, diffusion_model) -> str:
        if isinstance(diffusion_model, QwenImageTransformer2DModel) and not cls.matches(diffusion_model):
            return ("It is a Qwen-Image-architecture model with a layer / extra timestep condition (Qwen-Image Layered), "
                    "which AnchorDiff does not support yet.")
        return ""

    # ------------------------------------------------------------------ names and layout
    def _edit_2511(self) -> bool:
        return getattr(self.dm, "default_ref_method", "index") == "index_timestep_zero"

    def variant(self) -> str:
        depth = len(self.dm.transformer_blocks)
        if depth == QWEN_IMAGE_DEPTH and self.width() == 3072:
            return "Qwen-Image Edit 2511" if self._edit_2511() else "Qwen-Image"
        return f"Qwen-Image-architecture model with {depth} blocks"

    def num_blocks(self) -> int:
        return len(self.dm.transformer_blocks)

    def heads(self) -> int:
        return self.dm.transformer_blocks[0].num_attention_heads

    def width(self) -> int:
        return self.dm.inner_dim

    def context_width(self) -> int:
        return self.dm.txt_in.in_features

    def block_keys(self) -> list[tuple[str, int]]:
        return [("double_block", i) for i in range(self.num_blocks())]

    def text_start(self, grid: tuple[int, int]) -> int:
        """RoPE position of the prompt's first token: just past the centred image grid's half extent."""
        return max(grid[0] // 2, grid[1] // 2)

    # ------------------------------------------------------------------ recording
    def initial_concepts(self, embeddings, dtype, device, batch: int) -> torch.Tensor:
        """Concept tokens through the model's text input (RMSNorm, then the linear embedder), like the prompt's."""
        context = embeddings.to(device=device, dtype=dtype)[None]
        return self.dm.txt_in(self.dm.txt_norm(context)).expand(batch, -1, -1).contiguous()

    def concept_rope(self, positions: torch.Tensor, grid: tuple[int, int], dtype, device) -> torch.Tensor:
        """The RoPE table of the concept tokens (the rule in the module docstring)."""
        ids = (self.text_start(grid) + positions.to(device)).to(torch.float32)
        return self.dm.pe_embedder(ids[None, :, None].expand(1, -1, 3)).to(dtype)

    def _heads(self, x: torch.Tensor, linear, norm) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        y = linear(x).view(b, t, self.heads(), -1).transpose(1, 2)
        return norm(y) if norm is not None else y

    def record_block(self, call, index: int, args: dict, captured: tuple) -> str:
        img, txt, vec = args["img"], args["txt"], args["vec"]
        q, k, v = (flat_heads(x, heads_first=True) for x in captured[:3])
        out = flat_heads(captured[3], heads_first=False)
        text_len, grid_tokens = txt.shape[1], call.grid_tokens
        if q.shape[1] != text_len + img.shape[1] or img.shape[1] < grid_tokens:
            return f"unexpected joint attention length {q.shape[1]} at block {index} (text {text_len} + image {grid_tokens})"
        if vec.shape[0] == 2 * img.shape[0]:  # Edit 2511's timestep-zero half modulates only the reference tokens
            vec = vec[: img.shape[0]]
        rows = call.rows
        if call.concept_state is None:
            call.concept_state = self.initial_concepts(call.concepts.embeddings, img.dtype, img.device, rows.numel())
            positions = call.concepts.positions
            if positions is None:
                raise AnchorDiffError("These concepts carry no token positions; encode them again with 'AnchorDiff Concepts' "
                                      "and Qwen-Image's text encoder.")
            call.concept_pe = self.concept_rope(positions, call.grid, captured[0].dtype, img.device)
        block, c = self.dm.transformer_blocks[index], call.concept_state
        mod1, mod2 = block.txt_mod(vec[rows]).chunk(2, dim=-1)
        normed, gate1 = block._modulate(block.txt_norm1(c), mod1)
        attn = block.attn
        q_c = apply_rope1(self._heads(normed, attn.add_q_proj, attn.norm_added_q), call.concept_pe)
        k_c = apply_rope1(self._heads(normed, attn.add_k_proj, attn.norm_added_k), call.concept_pe)
        v_c = self._heads(normed, attn.add_v_proj, None)
        q_c, k_c, v_c = (flat_heads(x, heads_first=True) for x in (q_c, k_c, v_c))
        o_c = call.step.record_block(index, *(split_image(x[rows], text_len, grid_tokens) for x in (q, k, v, out)),
                                     k[rows, :text_len], q_c, k_c, v_c,
                                     image_rows_lse(captured[4], rows, text_len, grid_tokens, q.shape[1]))
        if index + 1 < self.num_blocks():  # the last block's concept output is never read
            c = c + gate1 * attn.to_add_out(o_c.to(c.dtype))
            normed2, gate2 = block._modulate(block.txt_norm2(c), mod2)
            c = c + gate2 * block.txt_mlp(normed2)
        call.concept_state = c
        comfy.model_management.throw_exception_if_processing_interrupted()
        return ""

    # ------------------------------------------------------------------ concepts
    @classmethod
    def accepts_tokens(cls, tokens) -> bool:
        return isinstance(tokens, dict) and QWEN_STREAM in tokens

    @classmethod
    def encode_concepts(cls, clip, names: list[str]) -> ConceptSet:
        """As Qwen-Image encodes a prompt: ComfyUI's chat template around the joined concept string,
        Qwen2.5-VL's last hidden states with the template's head dropped (ComfyUI's text encoder does
        that), at the concepts' token positions. Each concept is found in the form it has in the
        joined string (template_positions)."""
        sequence, positions, head = template_positions(clip, names, _ids)
        cond = clip.encode_from_tokens(clip.tokenize(join_concepts(names)))
        dropped = len(sequence) - cond.shape[1] if cond.dim() == 3 else -1
        if cond.dim() != 3 or not 0 <= dropped <= head:
            raise AnchorDiffError(f"The text encoder output has shape {tuple(cond.shape)} for {len(sequence)} tokens; "
                                  "Qwen-Image expects [1, L, 3584] Qwen2.5-VL features without the chat template's head.")
        flat = [p for concept in positions for p in concept]
        owner = [k for k, concept in enumerate(positions) for _ in concept]
        at = torch.tensor(flat, dtype=torch.long) - dropped  # places in the encoded sequence the model sees
        return ConceptSet(tuple(names), cond[0, at].detach().float().cpu(), torch.tensor(owner, dtype=torch.long),
                          cls.family, positions=at)
