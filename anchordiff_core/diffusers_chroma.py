"""Record AnchorDiff's maps from a diffusers `ChromaTransformer2DModel` (no ComfyUI).

The independent cross-check of the ComfyUI Chroma adapter (nodes/models/chroma.py). Chroma's blocks
in diffusers are Flux's attention (FluxAttention, FluxAttnProcessor) with "pruned" norms: each
block's modulation comes from the model's approximator as `temb` (a double block's `temb` holds
the image stream's 6 slots, then the text stream's 6), so the Flux recorder applies with the text
slots taken from there. Text: T5-XXL features only, every token at position 0.

    recorder = DiffusersChromaRecorder(pipe.transformer, concepts, graph_layers=(22, 44))
    maps = recorder.record(packed_latents, img_ids, txt_ids, sigma, prompt_embeds, grid=(h, w))
"""
from __future__ import annotations

import torch

from .diffusers_flux import DiffusersFluxRecorder
from .maps import AttentionMaps


class DiffusersChromaRecorder(DiffusersFluxRecorder):
    """One forward pass of a diffusers Chroma transformer, recording AnchorDiff's maps for every row
    of the batch (pass conditional rows only)."""

    @torch.no_grad()
    def record(self, hidden_states, img_ids, txt_ids, timestep, encoder_hidden_states,
               grid: tuple[int, int] = None, image_size: tuple[int, int] = None) -> AttentionMaps:
        """hidden_states: packed latents [B, N, 64]; grid: the (h, w) token grid of its N tokens; timestep: sigma."""
        return self._record(grid, image_size, timestep, hidden_states, encoder_hidden_states, dict(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
            img_ids=img_ids, txt_ids=txt_ids, return_dict=False))

    @staticmethod
    def _text_temb(temb: torch.Tensor) -> torch.Tensor:
        return temb[:, 6:]  # ChromaTransformerBlock: temb_img, temb_txt = temb[:, :6], temb[:, 6:]
