"""Flux.1 dev / schnell, and Kontext's reference tokens (ComfyUI's comfy/ldm/flux/model.py, layers.py).

Layout (read in ComfyUI 0.3.75 and 0.33.0):
- `double_blocks[i]` (DoubleStreamBlock): separate image and text weights, one joint attention over
  [text, image (+ Kontext reference tokens)]; replace key ("double_block", i), args img, txt, vec, pe.
- `single_blocks[j]` (SingleStreamBlock): one stream x = [text, image (+ references)] with shared
  weights; replace key ("single_block", j), args img (= x), vec, pe. 0.33 also passes `img_slice`.
- q and k reach the attention call already RoPE-rotated and laid out [B, heads, L, head_dim]
  (`skip_reshape=True`); the output is [B, L, heads * head_dim].
- Text tokens of Flux.1 all sit at position 0 (txt_ids are zeros): the concept tokens are rotated
  with the first text token's position, i.e. exactly as every prompt token.
- Guidance-distilled (dev): one forward per step with the positive conditioning only (cfg 1); the
  generic recorder's per-call logic already handles any cond/uncond layout.
Recorder block order: the double blocks 0..D-1, then the single blocks D..D+S-1.

The concept stream (ConceptAttention's, as for SD3) runs through each double block's text-stream
weights (txt_mod, txt_norm1, txt_attn, txt_mlp) and each single block's shared weights (linear1,
linear2), for the concept tokens only: the image and the prompt tokens are never touched.
"""
from __future__ import annotations

import math

import torch

import comfy.model_management
from comfy.ldm.flux.layers import ModulationOut, apply_mod
from comfy.ldm.flux.math import apply_rope
from comfy.ldm.flux.model import Flux

from ...anchordiff_core.concepts import ConceptSet, join_concepts, locate_tokens
from ..errors import AnchorDiffError
from .base import BackboneAdapter, RelativeDepthDefaults, image_rows_lse

T5_SPECIAL = {0, 1}  # T5's pad and end-of-sequence ids
FLUX1_DEPTHS = (19, 38)  # Flux.1 dev / schnell / Kontext / Krea: 19 double + 38 single blocks


def _t5_ids(tokens: dict) -> list[list[int]]:
    return [[int(t[0]) for t in chunk] for chunk in tokens["t5xxl"]]


def _rows(mod: ModulationOut, rows) -> ModulationOut:
    """One modulation's shift / scale / gate [B, 1, width] for the recorded rows."""
    return ModulationOut(shift=mod.shift[rows], scale=mod.scale[rows], gate=mod.gate[rows])


class ModulationSlices:
    """For FluxAdapter subclasses whose blocks have no modulation layers of their own (Chroma, Flux.2):
    the model computes the modulations once and each block receives them as `vec`, a double block
    ((img_mod1, img_mod2), (txt_mod1, txt_mod2)), a single block one ModulationOut, each of shift /
    scale / gate [B, 1, width]. The concept stream takes the prompt stream's (txt_mod1 / txt_mod2, the
    single block's one): the modulation the prompt's tokens get."""

    def _unexpected_modulation(self, index: int, vec) -> str:
        if index < self.depths[0]:
            ok = isinstance(vec, (tuple, list)) and len(vec) == 2 and all(len(pair) == 2 for pair in vec)
        else:
            ok = isinstance(vec, ModulationOut)
        return "" if ok else f"block {index} did not receive {self.family}'s modulation slices (got {type(vec).__name__})"

    def _text_modulation(self, block, vec, rows):
        _img, txt = vec
        return tuple(_rows(mod, rows) for mod in txt)

    def _single_modulation(self, block, vec, rows):
        return _rows(vec, rows)


class FluxAdapter(RelativeDepthDefaults, BackboneAdapter):
    """Default layers: RelativeDepthDefaults (Flux.1: graph 22, 44 of 0..56, i.e. single-stream blocks 3 and
    25; Seg4Diff 22). Unmeasured on real weights."""

    family = "Flux.1 (dev, schnell, Kontext)"

    @classmethod
    def matches(cls, diffusion_model) -> bool:
        if not isinstance(diffusion_model, Flux):
            return False
        params = diffusion_model.params
        flipped = any(getattr(b, "flipped_img_txt", False) for b in diffusion_model.double_blocks)
        return (not getattr(params, "global_modulation", False) and not getattr(params, "txt_ids_dims", [])
                and diffusion_model.patch_size == 2 and not flipped and len(diffusion_model.double_blocks) > 0)

    @classmethod
    def unsupported_reason(cls, diffusion_model) -> str:
        if isinstance(diffusion_model, Flux) and not cls.matches(diffusion_model):
            params = diffusion_model.params
            what = ("text tokens at RoPE positions" if getattr(params, "txt_ids_dims", []) else
                    f"patch size {diffusion_model.patch_size}" if diffusion_model.patch_size != 2 else
                    "image and text streams flipped" if any(getattr(b, "flipped_img_txt", False) for b in diffusion_model.double_blocks)
                    else "no double-stream blocks")
            if getattr(params, "global_modulation", False):
                return ""  # Flux.2's layout: nodes/models/flux2.py says why one it does not take is refused
            return (f"It is a Flux-architecture model that is neither Flux.1 nor Flux.2 ({what}; e.g. Ovis-Image or "
                    "LongCat-Image), which AnchorDiff does not support yet.")
        return ""

    # ------------------------------------------------------------------ names and layout
    @property
    def depths(self) -> tuple[int, int]:
        return len(self.dm.double_blocks), len(self.dm.single_blocks)

    def variant(self) -> str:
        double, single = self.depths
        dev = bool(self.dm.params.guidance_embed)
        if (double, single) == FLUX1_DEPTHS and self.dm.hidden_size == 3072:
            return "Flux.1 dev" if dev else "Flux.1 schnell"
        kind = "guidance-distilled, dev-style" if dev else "schnell-style"
        return f"Flux.1-architecture model ({kind}) with {double} double + {single} single blocks"

    def num_blocks(self) -> int:
        return sum(self.depths)

    def heads(self) -> int:
        return self.dm.num_heads

    def width(self) -> int:
        return self.dm.hidden_size

    def context_width(self) -> int:
        return self.dm.txt_in.in_features

    def block_keys(self) -> list[tuple[str, int]]:
        double, single = self.depths
        return [("double_block", i) for i in range(double)] + [("single_block", j) for j in range(single)]

    # ------------------------------------------------------------------ recording
    def initial_concepts(self, embeddings, dtype, device, batch: int) -> torch.Tensor:
        """Concept tokens through the model's text input layer, like the prompt's tokens."""
        context = embeddings.to(device=device, dtype=dtype)[None]
        if getattr(self.dm, "txt_norm", None) is not None:
            context = self.dm.txt_norm(context)
        return self.dm.txt_in(context).expand(batch, -1, -1).contiguous()

    def _heads_qkv(self, qkv: torch.Tensor, norm, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concept q, k, v [B, T, H*d] from a fused qkv projection, normalised and rotated with `rope`
        (the concept tokens' RoPE table, `_concept_rope`)."""
        b, t = qkv.shape[0], qkv.shape[1]
        q, k, v = qkv.view(b, t, 3, self.heads(), -1).permute(2, 0, 3, 1, 4)
        q, k = norm(q, k, v)
        if rope is not None:
            q, k = apply_rope(q, k, rope)
        return tuple(x.transpose(1, 2).reshape(b, t, -1) for x in (q, k, v))

    def _concept_rope(self, call, pe, rows, tokens: int):
        """The RoPE table of the concept tokens. Flux.1: every text token sits at position 0, so the
        concepts are rotated with the first text token's entry of the joint table `pe`."""
        if pe is None:
            return None
        at = pe[rows] if pe.shape[0] > 1 else pe
        return at[:, :, :1].expand(*at.shape[:2], tokens, *at.shape[3:]).contiguous()

    # The modulation of the prompt stream, which the concept stream shares (Flux.1: one vector per
    # row, each block's own txt_mod / modulation layer makes its shift, scale and gate).
    def _unexpected_modulation(self, index: int, vec) -> str:
        if not isinstance(vec, torch.Tensor):
            return f"block {index} has no per-block modulation vector (not a Flux.1 model)"
        return ""

    def _text_modulation(self, block, vec: torch.Tensor, rows):
        """A double block's two text-stream modulations (attention, MLP) for the recorded rows."""
        return block.txt_mod(vec[rows])

    def _single_modulation(self, block, vec: torch.Tensor, rows):
        """A single block's modulation for the recorded rows."""
        return block.modulation(vec[rows])[0]

    def record_block(self, call, index: int, args: dict, captured: tuple) -> str:
        double, _single = self.depths
        img, vec, pe = args["img"], args["vec"], args.get("pe")
        wrong = self._unexpected_modulation(index, vec)
        if wrong:
            return wrong
        q, k, v = (x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1) for x in captured[:3])  # [B, H, L, d] -> [B, L, H*d]
        out = captured[3].reshape(captured[3].shape[0], captured[3].shape[1], -1)
        if index < double:
            text_len = args["txt"].shape[1]
            call.text_len = text_len
            total = text_len + img.shape[1]
        else:
            text_len = getattr(call, "text_len", None)
            img_slice = args.get("transformer_options", {}).get("img_slice")
            if img_slice is not None:
                text_len = img_slice[0]
            total = img.shape[1]
        grid = call.grid_tokens
        if text_len is None or q.shape[1] != total or total < text_len + grid:
            return f"unexpected joint attention length {q.shape[1]} at block {index} (text {text_len} + image {grid})"
        rows = call.rows
        lse = image_rows_lse(captured[4], rows, text_len, grid, total)
        if call.concept_state is None:
            call.concept_state = self.initial_concepts(call.concepts.embeddings, img.dtype, img.device, rows.numel())
        c = call.concept_state
        image = slice(text_len, text_len + grid)  # reference-image tokens (Kontext) after the grid are left out
        if index < double:
            block = self.dm.double_blocks[index]
            mod1, mod2 = self._text_modulation(block, vec, rows)
            normed = apply_mod(block.txt_norm1(c), 1 + mod1.scale, mod1.shift)
            q_c, k_c, v_c = self._heads_qkv(block.txt_attn.qkv(normed), block.txt_attn.norm,
                                             self._concept_rope(call, pe, rows, c.shape[1]))
            o_c = call.step.record_block(index, q[rows, image], k[rows, image], v[rows, image], out[rows, image],
                                         k[rows, :text_len], q_c, k_c, v_c, lse)
            c = c + apply_mod(block.txt_attn.proj(o_c.to(c.dtype)), mod1.gate)
            c = c + apply_mod(block.txt_mlp(apply_mod(block.txt_norm2(c), 1 + mod2.scale, mod2.shift)), mod2.gate)
        else:
            block = self.dm.single_blocks[index - double]
            mod = self._single_modulation(block, vec, rows)
            qkv, mlp = torch.split(block.linear1(apply_mod(block.pre_norm(c), 1 + mod.scale, mod.shift)),
                                   [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
            q_c, k_c, v_c = self._heads_qkv(qkv, block.norm, self._concept_rope(call, pe, rows, c.shape[1]))
            o_c = call.step.record_block(index, q[rows, image], k[rows, image], v[rows, image], out[rows, image],
                                         k[rows, :text_len], q_c, k_c, v_c, lse)
            if index + 1 < self.num_blocks():  # the last block's concept output is never read
                c = c + apply_mod(block.linear2(torch.cat((o_c.to(c.dtype), block.mlp_act(mlp)), 2)), mod.gate)
        call.concept_state = c
        comfy.model_management.throw_exception_if_processing_interrupted()
        return ""

    # ------------------------------------------------------------------ concepts
    @classmethod
    def accepts_tokens(cls, tokens) -> bool:
        return isinstance(tokens, dict) and "t5xxl" in tokens and "l" in tokens and "g" not in tokens

    @classmethod
    def encode_concepts(cls, clip, names: list[str]) -> ConceptSet:
        """As Flux.1 encodes a prompt: the T5-XXL features (what the model embeds; CLIP-L only gives
        the pooled vector) at the concepts' T5 token positions of the joined concept string."""
        tokens = clip.tokenize(join_concepts(names))
        sequence = [i for chunk in _t5_ids(tokens) for i in chunk]
        pieces = [[i for chunk in _t5_ids(clip.tokenize(name)) for i in chunk if i not in T5_SPECIAL] for name in names]
        try:
            positions = locate_tokens(sequence, pieces, names)
        except ValueError as error:
            raise AnchorDiffError(str(error)) from None
        cond, _pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        if cond.dim() != 3 or cond.shape[1] < len(sequence):
            raise AnchorDiffError(f"The text encoder output has shape {tuple(cond.shape)}; {cls.family} expects [1, L, 4096] T5 features.")
        flat = [p for concept in positions for p in concept]
        owner = [k for k, concept in enumerate(positions) for _ in concept]
        return ConceptSet(tuple(names), cond[0, flat].detach().float().cpu(), torch.tensor(owner, dtype=torch.long), cls.family)
