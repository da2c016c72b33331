"""Flux.2 dev and Flux.2 Klein: ComfyUI's `Flux` class (comfy/ldm/flux/model.py) built with
`global_modulation` (supported_models.Flux2, model_base.Flux2), so a FluxAdapter with its own
modulation and text positions.

Read in ComfyUI 0.3.75 and 0.33.0 (both load Flux.2 dev and Klein diffusion models; only 0.33 ships
Klein's Qwen3 text encoders, 0.3.75 only dev's Mistral Small 3.1). What is the same as Flux.1: the
double-stream blocks (replace key ("double_block", i), args img, txt, vec, pe) and the single-stream
blocks (("single_block", j), args img = [text, image], vec, pe; 0.33 also passes `img_slice`), one
joint attention over [text, image (+ reference-image tokens)], q and k RoPE-rotated [B, heads, L, d].
What differs:
- Modulation: no per-block modulation layers. The model computes it once from the timestep (+
  guidance) embedding (double_stream_modulation_img / _txt, single_stream_modulation) and hands each
  block its slices as `vec`, exactly as Chroma's approximator does: ModulationSlices. The concept
  stream takes the prompt stream's (txt_mod1 / txt_mod2, the single blocks' one).
- MLPs: SwiGLU with the gate fused into the first linear layer (`mlp_silu_act`), no biases anywhere
  (`ops_bias` False, `qkv_bias` False); the Flux.1 code path calls the blocks' own layers, so it holds.
- Patch size 1 on 128-channel latents at 1/16 of the image (Flux.2's VAE latents, 2x2-patchified in
  latent space): one token per latent cell.
- RoPE on four axes (32 each, theta 2000). Image tokens: (reference index, row, column, 0). Text tokens
  carry a sequence position: the prompt's token t at (0, 0, 0, t) (axis 3: 0.3.75 where there are
  four axes, 0.33 `params.txt_ids_dims`). model_base.Flux2 left-pads the prompt's features with zeros
  to FLUX2_TEXT_LEN tokens first, so a prompt of n < 512 tokens sits at 512 - n .. 511.
- Reference images (multi-reference editing, ReferenceLatent): their tokens follow the grid in the
  joint sequence (method "index": reference k at index 10 k) and are left out of every map and of the
  concept stream's keys, as Kontext's. 0.33's "index_timestep_zero" modulates them with timestep 0: the
  single blocks then receive two modulation slots per row, the text (hence the concepts) uses slot 0.
- Guidance: dev is guidance-distilled (one forward per step, cfg 1); Klein has no guidance embedding
  (its distilled models run at cfg 1, its base models with real CFG); the generic recorder keeps the
  conditional rows either way.

Concept positions (a rule, written in docs/DESIGN.md): each concept token is rotated at the position
it has when the joined concept string is encoded as the prompt: its place in the encoded sequence
(chat template included) plus model_base.Flux2's left padding of that sequence to 512 tokens.

Concepts are encoded by the backbone's own text encoder (Flux.2 dev: Mistral Small 3.1, ComfyUI's
Flux2Tokenizer / flux2_te, stream "mistral3_24b"; Klein: Qwen3 4B / 8B, KleinTokenizer / klein_te,
streams "qwen3_4b" / "qwen3_8b"): ComfyUI's chat template around the joined concept string, the three
tapped hidden layers concatenated (what the model embeds), at the concepts' token positions.
"""
from __future__ import annotations

import torch

from comfy.ldm.flux.layers import ModulationOut
from comfy.ldm.flux.model import Flux

from ...anchordiff_core.anchors import PIXELS_PER_TOKEN
from ...anchordiff_core.concepts import ConceptSet, join_concepts
from ...anchordiff_core.diffusers_flux2 import FLUX2_TEXT_AXIS
from ..errors import AnchorDiffError
from .flux import FluxAdapter, ModulationSlices
from .qwen_image import template_positions

FLUX2_TEXT_LEN = 512  # model_base.Flux2.extra_conds left-pads the prompt features to this many tokens
FLUX2_DEV = (8, 48, 6144)  # Flux.2 dev: 8 double + 48 single blocks, width 6144 (48 heads of 128)
# ComfyUI's text-encoder streams of the Flux.2 family, and the width of what each gives the model
# (three tapped hidden layers concatenated)
FLUX2_STREAMS = {"mistral3_24b": ("Mistral Small 3.1", 3 * 5120), "qwen3_4b": ("Qwen3 4B", 3 * 2560),
                 "qwen3_8b": ("Qwen3 8B", 3 * 4096)}


def _text_axes(params) -> list[int]:
    axes = getattr(params, "txt_ids_dims", None)
    if axes is None:  # 0.3.75: a four-axis model puts the text position on the last axis
        axes = [FLUX2_TEXT_AXIS] if len(params.axes_dim) == 4 else []
    return list(axes)


def _stream(tokens) -> str:
    found = [s for s in FLUX2_STREAMS if s in tokens] if isinstance(tokens, dict) else []
    return found[0] if len(found) == 1 and len(tokens) == 1 else ""


class Flux2Adapter(ModulationSlices, FluxAdapter):
    """Flux.1's recording with global modulation slices and text RoPE positions. Default layers:
    RelativeDepthDefaults (Flux.2 dev's 56 blocks: graph 22, 43; Seg4Diff 22). Unmeasured on real weights."""

    family = "Flux.2 (dev, Klein)"
    pixels_per_latent = PIXELS_PER_TOKEN  # Flux.2 latents: the VAE's 8x, 2x2 patches folded into 128 channels
    patch = 1

    @classmethod
    def _layout_problem(cls, dm) -> str:
        """"" for a Flux.2 / Klein layout, else what differs (for a global-modulation Flux model)."""
        params = dm.params
        if dm.patch_size != 1:
            return f"patch size {dm.patch_size}"
        if len(params.axes_dim) != 4 or _text_axes(params) != [FLUX2_TEXT_AXIS]:
            return f"RoPE axes {list(params.axes_dim)} with text positions on {_text_axes(params)}"
        if getattr(params, "yak_mlp", False) or getattr(dm, "txt_norm", None) is not None or dm.vector_in is not None:
            return "an MLP, text norm or pooled vector Flux.2 does not have"
        if not params.mlp_silu_act or len(dm.double_blocks) == 0:
            return "no SwiGLU MLP or no double-stream blocks"
        return ""

    @classmethod
    def matches(cls, diffusion_model) -> bool:
        return (isinstance(diffusion_model, Flux) and bool(getattr(diffusion_model.params, "global_modulation", False))
                and not cls._layout_problem(diffusion_model))

    @classmethod
    def unsupported_reason(cls, diffusion_model) -> str:
        if (isinstance(diffusion_model, Flux) and getattr(diffusion_model.params, "global_modulation", False)
                and not cls.matches(diffusion_model)):
            return (f"It is a Flux.2-architecture model with {cls._layout_problem(diffusion_model)}, unlike Flux.2 dev / "
                    "Klein, which AnchorDiff does not support yet.")
        return ""

    def variant(self) -> str:
        double, single = self.depths
        encoder = next((name for name, width in FLUX2_STREAMS.values() if width == self.context_width()), None)
        if (double, single, self.dm.hidden_size) == FLUX2_DEV and encoder == "Mistral Small 3.1":
            return "Flux.2 dev"
        if encoder is not None and encoder.startswith("Qwen3") and not self.dm.params.guidance_embed:
            return f"Flux.2 Klein ({encoder} text) with {double} double + {single} single blocks"
        kind = "guidance-distilled" if self.dm.params.guidance_embed else "no guidance embedding"
        return f"Flux.2-architecture model ({kind}) with {double} double + {single} single blocks"

    # ------------------------------------------------------------------ recording
    def _single_modulation(self, block, vec, rows):
        """The single blocks' slot of the text (hence the concepts): the first (0.33's
        index_timestep_zero gives a second one, for the reference tokens)."""
        return ModulationOut(shift=vec.shift[rows, :1], scale=vec.scale[rows, :1], gate=vec.gate[rows, :1])

    def concept_rope(self, positions: torch.Tensor, device) -> torch.Tensor:
        """The RoPE table [1, 1, T, d/2, 2, 2] of concept tokens at these text positions (image axes 0)."""
        ids = torch.zeros(1, positions.numel(), len(self.dm.params.axes_dim), device=device, dtype=torch.float32)
        for axis in _text_axes(self.dm.params):
            ids[0, :, axis] = positions.to(device=device, dtype=torch.float32)
        return self.dm.pe_embedder(ids)

    def _concept_rope(self, call, pe, rows, tokens: int):
        """The concepts' own positions (the rule in the module docstring), computed once per call."""
        if call.concept_pe is None:
            positions = call.concepts.positions
            if positions is None or positions.numel() != tokens:
                raise AnchorDiffError("These concepts carry no Flux.2 text positions; encode them again with "
                                      "'AnchorDiff Concepts' and the Flux.2 model's text encoder.")
            call.concept_pe = self.concept_rope(positions, pe.device if pe is not None else "cpu").to(
                pe.dtype if pe is not None else torch.float32)
        return call.concept_pe

    # ------------------------------------------------------------------ concepts
    @classmethod
    def accepts_tokens(cls, tokens) -> bool:
        return bool(_stream(tokens))

    @classmethod
    def encode_concepts(cls, clip, names: list[str]) -> ConceptSet:
        """As Flux.2 encodes a prompt: ComfyUI's chat template around the joined concept string, the text
        encoder's output (three hidden layers concatenated) at the concepts' token positions, each found
        as template_positions does after the tokenizer's padding is set aside (Klein's tokenizer pads
        to 512 on the right, Mistral's on the left)."""
        tokens = clip.tokenize(join_concepts(names))
        stream = _stream(tokens)
        pad = getattr(getattr(clip.tokenizer, stream, None), "pad_token", None)

        def raw(tok) -> list[int]:
            return [int(t[0]) for chunk in tok[stream] for t in chunk]

        def unpadded(tok) -> list[int]:
            ids = raw(tok)
            lead = next((i for i, x in enumerate(ids) if x != pad), len(ids))
            end = len(ids) - next((i for i, x in enumerate(reversed(ids)) if x != pad), len(ids))
            return ids[lead:end]

        full = raw(tokens)
        lead = next((i for i, x in enumerate(full) if x != pad), len(full))
        _sequence, positions, _head = template_positions(clip, names, unpadded)
        cond = clip.encode_from_tokens(tokens)
        name, width = FLUX2_STREAMS[stream]
        if cond.dim() != 3 or cond.shape[1] != len(full) or cond.shape[2] != width:
            raise AnchorDiffError(f"The text encoder output has shape {tuple(cond.shape)} for {len(full)} tokens; "
                                  f"Flux.2 expects [1, {len(full)}, {width}] {name} features (three layers).")
        flat = [p + lead for concept in positions for p in concept]  # places in the encoded sequence
        owner = [k for k, concept in enumerate(positions) for _ in concept]
        at = torch.tensor(flat, dtype=torch.long)
        rope_positions = at + max(0, FLUX2_TEXT_LEN - cond.shape[1])  # model_base.Flux2's left padding
        return ConceptSet(tuple(names), cond[0, at].detach().float().cpu(), torch.tensor(owner, dtype=torch.long),
                          cls.family, positions=rope_positions)
