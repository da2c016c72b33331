"""Record AnchorDiff's maps from a diffusers `QwenImageTransformer2DModel` (Qwen-Image; no ComfyUI).

The independent cross-check of the ComfyUI Qwen-Image adapter (nodes/models/qwen_image.py): diffusers
has its own attention processor, block code and RoPE (complex frequencies, the image grid centred by
`scale_rope`, the text after it from `max_vid_index`). Every block is a double-stream block.

    recorder = DiffusersQwenImageRecorder(pipe.transformer, concepts, graph_layers=(23, 46))
    maps = recorder.record(packed_latents, sigma, prompt_embeds, img_shapes, grid=(h, w))

`concepts` is a ConceptSet with `positions` (places in the encoded concept string, as Qwen-Image's
text encoder outputs it): concept token p is rotated at the text position the prompt's token p would
have (diffusers: `pos_freqs[max_vid_index + p]`). Reference-image tokens (Qwen-Image Edit) follow the
grid's tokens and are left out.
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


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
    return apply_rotary_emb_qwen(x, freqs, use_real=False)


class _CapturingQwenProcessor:
    """diffusers' Qwen-Image joint attention, computed as QwenDoubleStreamAttnProcessor2_0 does,
    keeping the rotated q, k, the v and the output of the whole sequence [text, image]."""

    def __init__(self, slot: dict):
        self.slot = slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        head_dim = attn.inner_dim // attn.heads

        def heads(x, norm=None):
            x = x.unflatten(-1, (-1, head_dim))
            return norm(x) if norm is not None else x

        q, k, v = heads(attn.to_q(hidden_states), attn.norm_q), heads(attn.to_k(hidden_states), attn.norm_k), heads(attn.to_v(hidden_states))
        eq = heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)
        ek = heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)
        ev = heads(attn.add_v_proj(encoder_hidden_states))
        img_freqs, txt_freqs = image_rotary_emb
        q, k = _rotate(q, img_freqs), _rotate(k, img_freqs)
        eq, ek = _rotate(eq, txt_freqs), _rotate(ek, txt_freqs)
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        mask = None
        if encoder_hidden_states_mask is not None:
            image = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask.bool(), image], 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        self.slot.update(q=q.flatten(2, 3), k=k.flatten(2, 3), v=v.flatten(2, 3), out=out)
        text_len = encoder_hidden_states.shape[1]
        txt, img = out[:, :text_len], out[:, text_len:]
        return attn.to_out[1](attn.to_out[0](img.contiguous())), attn.to_add_out(txt.contiguous())


class DiffusersQwenImageRecorder(DiffusersRecorder):
    """One forward pass of a diffusers Qwen-Image transformer, recording AnchorDiff's maps for every
    row of the batch."""

    def __init__(self, transformer, concepts: ConceptSet, graph_layers: Sequence[int], seg4diff_layer: Optional[int] = None,
                 store_device=None):
        if concepts.positions is None:
            raise ValueError("Qwen-Image's concept stream needs the concepts' token positions (ConceptSet.positions)")
        super().__init__(transformer, concepts, len(transformer.transformer_blocks), graph_layers, seg4diff_layer, store_device)

    @torch.no_grad()
    def record(self, hidden_states, timestep, encoder_hidden_states, img_shapes, grid: tuple[int, int],
               image_size: tuple[int, int] = None, encoder_hidden_states_mask=None) -> AttentionMaps:
        """hidden_states: packed latents [B, N, 64] (the grid's tokens, row-major, then any reference
        image's); img_shapes: diffusers' [[(1, h, w), (1, h_ref, w_ref), ...]] per row; timestep: sigma."""
        tr = self.transformer
        blocks = list(tr.transformer_blocks)
        step = self._step(tr.config.num_attention_heads)
        batch = hidden_states.shape[0]
        positions = self.concepts.positions
        _vid, text_freqs = tr.pos_embed(img_shapes, max_txt_seq_len=int(positions.max()) + 1, device=hidden_states.device)
        state = {"concepts": self._initial_concepts(torch.nn.Sequential(tr.txt_norm, tr.txt_in), encoder_hidden_states, batch),
                 "freqs": text_freqs[positions.to(hidden_states.device)]}
        grid_tokens = grid[0] * grid[1]
        slots = [dict() for _ in blocks]

        def pre(index, block, args, kwargs):
            slots[index]["temb"] = kwargs["temb"]
            slots[index]["text_len"] = kwargs["encoder_hidden_states"].shape[1]

        def post(index, block):
            self._advance(block, index, slots[index], state, step, grid_tokens)

        with self._hooked(blocks, lambda i: _CapturingQwenProcessor(slots[i]), pre, post):
            tr(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
               encoder_hidden_states_mask=encoder_hidden_states_mask, img_shapes=img_shapes, return_dict=False)
        sigma = float(torch.as_tensor(timestep).reshape(-1)[0])
        return self._finish(step, batch, grid, image_size or (grid[0] * PIXELS_PER_TOKEN, grid[1] * PIXELS_PER_TOKEN), sigma)

    def _advance(self, block, index: int, slot: dict, state: dict, step: StepRecorder, grid_tokens: int) -> None:
        """The concept stream through this block with the prompt stream's (txt_*) weights."""
        attn, temb, c, text_len = block.attn, slot["temb"], state["concepts"], slot["text_len"]
        if block.zero_cond_t:  # Edit 2511: the second half (timestep 0) modulates only reference tokens
            temb = temb.chunk(2, dim=0)[0]
        mod1, mod2 = block.txt_mod(temb).chunk(2, dim=-1)
        normed, gate1 = block._modulate(block.txt_norm1(c), mod1)
        head_dim = attn.inner_dim // attn.heads

        def project(linear, norm):
            y = linear(normed).unflatten(-1, (-1, head_dim))
            return norm(y) if norm is not None else y

        q_c = _rotate(project(attn.add_q_proj, attn.norm_added_q), state["freqs"])
        k_c = _rotate(project(attn.add_k_proj, attn.norm_added_k), state["freqs"])
        v_c = project(attn.add_v_proj, None)
        q, k, v, out = slot["q"], slot["k"], slot["v"], slot["out"]
        image = slice(text_len, text_len + grid_tokens)
        o_c = step.record_block(index, q[:, image], k[:, image], v[:, image], out[:, image], k[:, :text_len],
                                q_c.flatten(2, 3), k_c.flatten(2, 3), v_c.flatten(2, 3))
        c = c + gate1 * attn.to_add_out(o_c.to(c.dtype))
        normed2, gate2 = block._modulate(block.txt_norm2(c), mod2)
        state["concepts"] = c + gate2 * block.txt_mlp(normed2)
        slot.clear()
