"""Record AnchorDiff's maps from a diffusers `FluxTransformer2DModel` (Flux.1; no ComfyUI).

The independent cross-check of the ComfyUI Flux adapter (nodes/models/flux.py): diffusers has its
own attention processor, block code, RoPE and weight layout (separate q / k / v projections, the
single blocks' MLP as `proj_mlp`). Block order as the adapter's: the double-stream blocks
(`transformer_blocks`), then the single-stream blocks (`single_transformer_blocks`).

    recorder = DiffusersFluxRecorder(pipe.transformer, concepts, graph_layers=(22, 44))
    maps = recorder.record(packed_latents, img_ids, txt_ids, sigma, prompt_embeds, pooled, guidance, grid=(h, w))

`concepts` is a ConceptSet whose embeddings are T5-XXL outputs at the concepts' token positions,
as the prompt's. Concept tokens sit at the first text token's position (0 for Flux.1).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .anchors import PIXELS_PER_TOKEN
from .concepts import ConceptSet
from .diffusers_capture import DiffusersRecorder
from .maps import AttentionMaps
from .recorder import StepRecorder


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb
    return apply_rotary_emb(x, rope, sequence_dim=1)


class _CapturingFluxProcessor:
    """diffusers' Flux attention, computed as FluxAttnProcessor does, keeping the rotated q, k, the v
    and the output of the whole joint sequence [text, image]."""

    def __init__(self, slot: dict):
        self.slot = slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q, k = _rotate(q, image_rotary_emb), _rotate(k, image_rotary_emb)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        out = out.flatten(2, 3).to(q.dtype)
        self.slot.update(q=q.flatten(2, 3), k=k.flatten(2, 3), v=v.flatten(2, 3), out=out, rope=image_rotary_emb)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        txt, img = out[:, :text_len], out[:, text_len:]
        return attn.to_out[1](attn.to_out[0](img.contiguous())), attn.to_add_out(txt.contiguous())


class DiffusersFluxRecorder(DiffusersRecorder):
    """One forward pass of a diffusers Flux transformer, recording AnchorDiff's maps for every row of
    the batch (guidance-distilled Flux has no unconditional rows)."""

    def __init__(self, transformer, concepts: ConceptSet, graph_layers: Sequence[int], seg4diff_layer: Optional[int] = None,
                 store_device=None):
        self.double = len(transformer.transformer_blocks)
        total = self.double + len(transformer.single_transformer_blocks)
        super().__init__(transformer, concepts, total, graph_layers, seg4diff_layer, store_device)

    @torch.no_grad()
    def record(self, hidden_states, img_ids, txt_ids, timestep, encoder_hidden_states, pooled_projections,
               guidance=None, grid: tuple[int, int] = None, image_size: tuple[int, int] = None) -> AttentionMaps:
        """hidden_states: packed latents [B, N, 64]; grid: the (h, w) token grid, row-major, of its N tokens
        (reference-image tokens, if any, would follow them and are left out); timestep: sigma."""
        return self._record(grid, image_size, timestep, hidden_states, encoder_hidden_states, dict(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
            timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False))

    def _record(self, grid, image_size, timestep, hidden_states, encoder_hidden_states, forward_kwargs: dict) -> AttentionMaps:
        """The forward pass with `forward_kwargs`, recording (shared by the Flux-shaped recorders)."""
        tr = self.transformer
        blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
        step = self._step(tr.config.num_attention_heads)
        batch = hidden_states.shape[0]
        state = {"concepts": self._initial_concepts(tr.context_embedder, encoder_hidden_states, batch)}
        grid_tokens = grid[0] * grid[1]
        slots = [dict() for _ in blocks]

        def pre(index, block, args, kwargs):
            slots[index]["temb"] = kwargs["temb"]
            if kwargs.get("encoder_hidden_states") is not None:  # else a single block of a joined [text, image] stream
                state["text_len"] = kwargs["encoder_hidden_states"].shape[1]
            slots[index]["text_len"] = state["text_len"]

        def post(index, block):
            self._advance(block, index, slots[index], state, step, grid_tokens)

        with self._hooked(blocks, lambda i: _CapturingFluxProcessor(slots[i]), pre, post):
            tr(**forward_kwargs)
        sigma = float(torch.as_tensor(timestep).reshape(-1)[0])
        return self._finish(step, batch, grid, image_size or (grid[0] * PIXELS_PER_TOKEN, grid[1] * PIXELS_PER_TOKEN), sigma)

    @staticmethod
    def _text_temb(temb: torch.Tensor) -> torch.Tensor:
        """The part of a double block's `temb` that modulates the text stream (Flux.1: all of it)."""
        return temb

    def _advance(self, block, index: int, slot: dict, state: dict, step: StepRecorder, grid_tokens: int) -> None:
        """The concept stream through this block with the prompt stream's (double) or shared (single) weights."""
        attn, temb, c, text_len = block.attn, slot["temb"], state["concepts"], slot["text_len"]
        rope = slot["rope"]
        at_text = None if rope is None else tuple(r[:1].expand(c.shape[1], -1) for r in rope)
        double = index < self.double

        def project(x, linear, norm):
            y = linear(x).unflatten(-1, (-1, attn.head_dim))
            y = norm(y) if norm is not None else y
            return y

        if double:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=self._text_temb(temb))
            q_c, k_c = project(norm_c, attn.add_q_proj, attn.norm_added_q), project(norm_c, attn.add_k_proj, attn.norm_added_k)
            v_c = project(norm_c, attn.add_v_proj, None)
        else:
            norm_c, gate = block.norm(c, emb=temb)
            q_c, k_c = project(norm_c, attn.to_q, attn.norm_q), project(norm_c, attn.to_k, attn.norm_k)
            v_c = project(norm_c, attn.to_v, None)
        if at_text is not None:
            q_c, k_c = _rotate(q_c, at_text), _rotate(k_c, at_text)
        q, k, v, out = slot["q"], slot["k"], slot["v"], slot["out"]
        image = slice(text_len, text_len + grid_tokens)
        o_c = step.record_block(index, q[:, image], k[:, image], v[:, image], out[:, image], k[:, :text_len],
                                q_c.flatten(2, 3), k_c.flatten(2, 3), v_c.flatten(2, 3))
        o_c = o_c.to(c.dtype)
        if double:
            c = c + c_gate_msa.unsqueeze(1) * attn.to_add_out(o_c)
            normed = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            c = c + c_gate_mlp.unsqueeze(1) * block.ff_context(normed)
        else:
            mlp = block.act_mlp(block.proj_mlp(norm_c))
            c = c + gate.unsqueeze(1) * block.proj_out(torch.cat([o_c, mlp], dim=2))
        state["concepts"] = c
        slot.clear()
