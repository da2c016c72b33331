"""Record AnchorDiff's maps from a diffusers `SD3Transformer2DModel` (no ComfyUI).

An independent implementation of the capture: diffusers orders the joint sequence image first,
names the layers differently and has its own attention processor.  It is the cross-check of the
ComfyUI patch and the start of the standalone path:

    recorder = DiffusersSD3Recorder(pipe.transformer, concepts, graph_layers=(9, 18))
    maps = recorder.record(latents, timestep, prompt_embeds, pooled_prompt_embeds)

`concepts` is a ConceptSet whose embeddings come from the same text encoders as the prompt
(CLIP-L + CLIP-G outputs at the concepts' token positions, zero-padded to 4096).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .anchors import PATCH_SIZE, PIXELS_PER_LATENT
from .concepts import ConceptSet
from .diffusers_capture import DiffusersRecorder
from .maps import AttentionMaps
from .recorder import StepRecorder


class _CapturingJointProcessor:
    """diffusers' joint attention, computed as JointAttnProcessor2_0 does, keeping q, k, v and the
    attention output of the image tokens."""

    def __init__(self, slot: dict):
        self.slot = slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, n = hidden_states.shape[0], hidden_states.shape[1]
        heads = attn.heads

        def project(x, linear, norm):
            y = linear(x).view(batch, -1, heads, linear.out_features // heads).transpose(1, 2)
            return norm(y) if norm is not None else y

        q = project(hidden_states, attn.to_q, attn.norm_q)
        k = project(hidden_states, attn.to_k, attn.norm_k)
        v = project(hidden_states, attn.to_v, None)
        q_t = project(encoder_hidden_states, attn.add_q_proj, attn.norm_added_q)
        k_t = project(encoder_hidden_states, attn.add_k_proj, attn.norm_added_k)
        v_t = project(encoder_hidden_states, attn.add_v_proj, None)
        query, key, value = (torch.cat(pair, dim=2) for pair in ((q, q_t), (k, k_t), (v, v_t)))
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[-1])
        out = out.to(query.dtype)

        def flat(x):  # [B, H, L, d] -> [B, L, H*d]
            return x.transpose(1, 2).reshape(batch, x.shape[2], -1)

        self.slot.update(q_img=flat(q), k_img=flat(k), v_img=flat(v), k_txt=flat(k_t), img_out=out[:, :n])
        img, txt = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, txt


class DiffusersSD3Recorder(DiffusersRecorder):
    """Runs one forward pass of a diffusers SD3 transformer and records AnchorDiff's maps for every
    row of the batch (pass conditional rows only)."""

    def __init__(
        self,
        transformer,
        concepts: ConceptSet,
        graph_layers: Sequence[int],
        seg4diff_layer: Optional[int] = None,
        store_device=None,
    ):
        super().__init__(transformer, concepts, len(transformer.transformer_blocks), graph_layers, seg4diff_layer, store_device)

    @torch.no_grad()
    def record(self, latents, timestep, encoder_hidden_states, pooled_projections) -> AttentionMaps:
        tr = self.transformer
        blocks = tr.transformer_blocks
        step = self._step(blocks[0].attn.heads)
        batch = latents.shape[0]
        state = {"concepts": self._initial_concepts(tr.context_embedder, encoder_hidden_states, batch)}
        slots = [dict() for _ in blocks]

        def pre(index, block, args, kwargs):
            slots[index]["temb"] = kwargs.get("temb", args[2] if len(args) > 2 else None)

        def post(index, block):
            self._advance_concepts(block, index, slots[index], state, step)

        with self._hooked(blocks, lambda i: _CapturingJointProcessor(slots[i]), pre, post):
            tr(hidden_states=latents, encoder_hidden_states=encoder_hidden_states,
               pooled_projections=pooled_projections, timestep=timestep, return_dict=False)
        h, w = latents.shape[-2] // PATCH_SIZE, latents.shape[-1] // PATCH_SIZE
        sigma = float(torch.as_tensor(timestep).reshape(-1)[0]) / 1000.0
        return self._finish(step, batch, (h, w), (latents.shape[-2] * PIXELS_PER_LATENT, latents.shape[-1] * PIXELS_PER_LATENT), sigma)

    @staticmethod
    def _advance_concepts(block, index: int, slot: dict, state: dict, step: StepRecorder) -> None:
        """The concept stream through this block with the prompt stream's weights (ConceptAttention)."""
        attn, temb, c = block.attn, slot["temb"], state["concepts"]
        heads = attn.heads
        if block.context_pre_only:
            norm_c = block.norm1_context(c, temb)
        else:
            norm_c, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(c, emb=temb)

        def project(linear, norm):
            y = linear(norm_c).view(c.shape[0], -1, heads, linear.out_features // heads).transpose(1, 2)
            y = norm(y) if norm is not None else y
            return y.transpose(1, 2).reshape(c.shape[0], c.shape[1], -1)

        q_c = project(attn.add_q_proj, attn.norm_added_q)
        k_c = project(attn.add_k_proj, attn.norm_added_k)
        v_c = project(attn.add_v_proj, None)
        o_c = step.record_block(index, slot["q_img"], slot["k_img"], slot["v_img"], slot["img_out"], slot["k_txt"], q_c, k_c, v_c)
        if not block.context_pre_only:
            c = c + gate_msa.unsqueeze(1) * attn.to_add_out(o_c.to(c.dtype))
            normed = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            state["concepts"] = c + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        slot.clear()
