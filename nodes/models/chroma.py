"""Chroma (ComfyUI's comfy/ldm/chroma/model.py): Flux.1-shaped, so a FluxAdapter with its own modulation.

Read in ComfyUI 0.3.75 and 0.33.0. Chroma runs Flux.1's DoubleStreamBlock / SingleStreamBlock built
with `modulation=False`, under the same replace keys ("double_block", i) / ("single_block", j),
the same joint sequence [text, image] (0.33 also passes `img_slice`), RoPE with every text token
at position 0 (txt_ids are zeros) and patch size 2. What differs:
- Modulation: no per-block txt_mod / modulation layers. The "distilled guidance layer"
  (Approximator) turns the timestep and guidance into one vector per modulation slot, and
  each block receives its slices as `vec`: a double block ((img_mod1, img_mod2), (txt_mod1,
  txt_mod2)), a single block one ModulationOut, each of shift / scale / gate [B, 1, width]. The
  concept stream uses the prompt stream's slices (txt_mod1 / txt_mod2, the single block's one):
  the same modulation the prompt's tokens get, as for Flux.1.
- Text: T5-XXL only (ComfyUI's PixArt T5 tokenizer: one "t5xxl" stream, no padding, no pooled
  vector); the model embeds the T5 features with `txt_in`, as Flux.1 does.
- No guidance embedding: Chroma is sampled with real CFG (cond and uncond rows in one call or
  two); the generic recorder keeps the conditional rows.
Chroma Radiance (pixel space, its own image path) is refused.
"""
from __future__ import annotations

from comfy.ldm.chroma.model import Chroma

from .flux import FLUX1_DEPTHS, FluxAdapter, ModulationSlices, _rows  # noqa: F401  (_rows: the tests plant bugs with it)


class ChromaAdapter(ModulationSlices, FluxAdapter):
    """Flux.1's recording with the approximator's modulation slices (ModulationSlices)."""

    family = "Chroma"

    @classmethod
    def matches(cls, diffusion_model) -> bool:
        return (type(diffusion_model) is Chroma and diffusion_model.patch_size == 2
                and len(diffusion_model.double_blocks) > 0)

    @classmethod
    def unsupported_reason(cls, diffusion_model) -> str:
        if isinstance(diffusion_model, Chroma) and not cls.matches(diffusion_model):
            return (f"It is a Chroma-architecture model that is not Chroma itself ({type(diffusion_model).__name__}: "
                    "Chroma Radiance works in pixel space), which AnchorDiff does not support yet.")
        return ""

    def variant(self) -> str:
        double, single = self.depths
        if (double, single) == FLUX1_DEPTHS and self.dm.hidden_size == 3072:
            return "Chroma"
        return f"Chroma-architecture model with {double} double + {single} single blocks"

    # ------------------------------------------------------------------ concepts: T5-XXL only
    @classmethod
    def accepts_tokens(cls, tokens) -> bool:
        return isinstance(tokens, dict) and set(tokens) == {"t5xxl"}
