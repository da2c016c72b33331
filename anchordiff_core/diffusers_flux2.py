"""Record AnchorDiff's maps from a diffusers `Flux2Transformer2DModel` (Flux.2 dev / Klein; no ComfyUI).

The independent cross-check of the ComfyUI Flux.2 adapter (nodes/models/flux2.py): diffusers has its
own block code, attention processors, RoPE and weight layout (separate q / k / v projections in the
double-stream blocks, the single blocks' fused `to_qkv_mlp_proj` / `to_out`, `Flux2Modulation`'s raw
modulation vectors split inside the blocks). Block order as the adapter's: the double-stream blocks
(`transformer_blocks`), then the single-stream blocks (`single_transformer_blocks`).

    recorder = DiffusersFlux2Recorder(pipe.transformer, concepts, graph_layers=(22, 43))
    maps = recorder.record(latents, img_ids, txt_ids, sigma, prompt_embeds, guidance, grid=(h, w))

`concepts` is a ConceptSet of the model's text-encoder features with their text positions
(`concepts.positions`): each concept token is rotated at (0, 0, 0, position), as a prompt token at
that place in the text sequence.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .anchors import PIXELS_PER_TOKEN
from .concepts import ConceptSet
from .diffusers_capture import DiffusersRecorder
from .diffusers_flux import _CapturingFluxProcessor, _rotate
from .maps import AttentionMaps

FLUX2_TEXT_AXIS = 3  # the RoPE axis of Flux.2's text positions: txt_ids (0, 0, 0, t) (diffusers' pipeline, ComfyUI's Flux)


class _CapturingFlux2SingleProcessor:
    """diffusers' Flux.2 single-stream ("parallel") attention, computed as Flux2ParallelSelfAttnProcessor
    does, keeping the rotated q, k, the v and the attention output of the joint sequence."""

    def __init__(self, slot: dict):
        self.slot = slot

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        proj = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = torch.split(proj, [3 * attn.inner_dim, proj.shape[-1] - 3 * attn.inner_dim], dim=-1)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            q, k = _rotate(q, image_rotary_emb), _rotate(k, image_rotary_emb)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        out = out.flatten(2, 3).to(q.dtype)
        self.slot.update(q=q.flatten(2, 3), k=k.flatten(2, 3), v=v.flatten(2, 3), out=out)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class DiffusersFlux2Recorder(DiffusersRecorder):
    """One forward pass of a diffusers Flux.2 transformer, recording AnchorDiff's maps for every row of
    the batch (pass conditional rows only)."""

    def __init__(self, transformer, concepts: ConceptSet, graph_layers: Sequence[int], seg4diff_layer: Optional[int] = None,
                 store_device=None):
        if concepts.positions is None:
            raise ValueError("Flux.2 concepts need their text positions (ConceptSet.positions)")
        self.double = len(transformer.transformer_blocks)
        total = self.double + len(transformer.single_transformer_blocks)
        super().__init__(transformer, concepts, total, graph_layers, seg4diff_layer, store_device)

    @torch.no_grad()
    def record(self, hidden_states, img_ids, txt_ids, timestep, encoder_hidden_states, guidance=None,
               grid: tuple[int, int] = None, image_size: tuple[int, int] = None, image_offset: int = 0,
               **forward_kwargs) -> AttentionMaps:
        """hidden_states: latent tokens [B, N, 128] (patch size 1), the grid's h * w tokens row-major after
        `image_offset` tokens (diffusers' KV "extract" mode puts reference tokens first), any other
        reference-image tokens after them (left out); img_ids [N, 4]; txt_ids [L, 4]; timestep: sigma;
        `forward_kwargs` go to the transformer (kv_cache_mode, num_ref_tokens, ref_fixed_timestep)."""
        tr = self.transformer
        blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
        step = self._step(tr.config.num_attention_heads)
        batch, text_len = hidden_states.shape[0], encoder_hidden_states.shape[1]
        c = self._initial_concepts(tr.context_embedder, encoder_hidden_states, batch)
        ids = torch.zeros(self.concepts.positions.numel(), len(tr.config.axes_dims_rope), device=c.device)
        ids[:, FLUX2_TEXT_AXIS] = self.concepts.positions.to(c.device, torch.float32)
        state = {"concepts": c, "rope": tr.pos_embed(ids)}
        grid_tokens = grid[0] * grid[1]
        slots = [dict() for _ in blocks]

        def pre(index, block, args, kwargs):
            slots[index]["mod"] = kwargs["temb_mod_txt"] if index < self.double else kwargs["temb_mod"]

        def post(index, block):
            self._advance(block, index, slots[index], state, step, text_len, image_offset, grid_tokens)

        def processor(index):
            return _CapturingFluxProcessor(slots[index]) if index < self.double else _CapturingFlux2SingleProcessor(slots[index])

        with self._hooked(blocks, processor, pre, post):
            tr(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
               img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False, **forward_kwargs)
        sigma = float(torch.as_tensor(timestep).reshape(-1)[0])
        return self._finish(step, batch, grid, image_size or (grid[0] * PIXELS_PER_TOKEN, grid[1] * PIXELS_PER_TOKEN), sigma)

    def _advance(self, block, index: int, slot: dict, state: dict, step, text_len: int, offset: int, grid_tokens: int) -> None:
        """The concept stream through this block with the prompt stream's (double) or shared (single)
        weights and the prompt stream's modulation."""
        from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

        attn, c, rope, mod = block.attn, state["concepts"], state["rope"], slot["mod"]
        if mod.dim() == 3 and mod.shape[1] > 1:  # "extract" mode: one modulation per token [text, references, image]
            mod = mod[:, :1]  # the text's

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        if index < self.double:
            (shift, scale, gate), (shift2, scale2, gate2) = Flux2Modulation.split(mod, 2)
            normed = block.norm1_context(c) * (1 + scale) + shift
            q_c, k_c = attn.norm_added_q(heads(attn.add_q_proj(normed))), attn.norm_added_k(heads(attn.add_k_proj(normed)))
            v_c = heads(attn.add_v_proj(normed))
        else:
            ((shift, scale, gate),) = Flux2Modulation.split(mod, 1)
            normed = block.norm(c) * (1 + scale) + shift
            proj = attn.to_qkv_mlp_proj(normed)
            qkv, mlp = torch.split(proj, [3 * attn.inner_dim, proj.shape[-1] - 3 * attn.inner_dim], dim=-1)
            q_c, k_c, v_c = (heads(x) for x in qkv.chunk(3, dim=-1))
            q_c, k_c = attn.norm_q(q_c), attn.norm_k(k_c)
        q_c, k_c = _rotate(q_c, rope), _rotate(k_c, rope)
        q, k, v, out = slot["q"], slot["k"], slot["v"], slot["out"]
        image = slice(text_len + offset, text_len + offset + grid_tokens)  # reference-image tokens are left out
        o_c = step.record_block(index, q[:, image], k[:, image], v[:, image], out[:, image], k[:, :text_len],
                                q_c.flatten(2, 3), k_c.flatten(2, 3), v_c.flatten(2, 3)).to(c.dtype)
        if index < self.double:
            c = c + gate * attn.to_add_out(o_c)
            c = c + gate2 * block.ff_context(block.norm2_context(c) * (1 + scale2) + shift2)
        else:
            c = c + gate * attn.to_out(torch.cat([o_c, attn.mlp_act_fn(mlp)], dim=-1))
        state["concepts"] = c
        slot.clear()
