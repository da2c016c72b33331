"""The one small interface between the generic recorder (nodes/model_patch.py) and a backbone.

An adapter holds everything the recorder must know about one family of ComfyUI diffusion models:
- which models it is (`matches`, on the `diffusion_model` ComfyUI loaded) and their variant names;
- the token layout: which blocks run joint text-image attention and under which block-replace
  patch key, where the image tokens sit in each attention call (text first in every family so
  far), how many image tokens form the token grid (reference-image tokens after them are left out),
  and how a latent maps to that grid;
- how the concept stream advances through one block with the prompt stream's own weights;
- the text encoder's layout, to encode concepts as the backbone encodes a prompt;
- the default graph / Seg4Diff layers.

Block indices are the recorder's: 0..num_blocks-1 over every joint-attention block in forward order
(for Flux: the double-stream blocks, then the single-stream blocks).
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar

import torch

from ...anchordiff_core.anchors import PATCH_SIZE, PIXELS_PER_LATENT


class BackboneAdapter:
    """One backbone family. Subclasses set `family` (a user-facing name) and implement the methods."""

    family: ClassVar[str] = ""
    # latent pixels per latent cell (VAE downscale) and latent cells per token side (patch size)
    pixels_per_latent: ClassVar[int] = PIXELS_PER_LATENT
    patch: ClassVar[int] = PATCH_SIZE

    def __init__(self, diffusion_model: torch.nn.Module):
        self.dm = diffusion_model

    # ------------------------------------------------------------------ detection and names
    @classmethod
    def matches(cls, diffusion_model) -> bool:
        raise NotImplementedError

    @classmethod
    def unsupported_reason(cls, diffusion_model) -> str:
        """For a model of a related architecture this adapter does not cover (e.g. Flux.2 for the
        Flux.1 adapter): a sentence saying so; else ""."""
        return ""

    def variant(self) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ layout
    def num_blocks(self) -> int:
        raise NotImplementedError

    def heads(self) -> int:
        raise NotImplementedError

    def width(self) -> int:
        """Hidden width of the image tokens (the size of O_II's rows)."""
        raise NotImplementedError

    def context_width(self) -> int:
        """Width of the text-encoder features the model embeds (what concept embeddings must have)."""
        raise NotImplementedError

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The image token grid (rows, columns) of a latent of this size; tokens are row-major."""
        return math.ceil(latent_hw[0] / self.patch), math.ceil(latent_hw[1] / self.patch)

    def block_keys(self) -> list[tuple[str, int]]:
        """The `patches_replace["dit"]` key of every recorded block, in the recorder's block order."""
        raise NotImplementedError

    def original_block(self, index: int, extra: dict) -> Callable[[dict], dict]:
        """The unpatched block as a replace patch calls it (args -> outputs)."""
        return extra["original_block"]

    # ------------------------------------------------------------------ recording one block
    def initial_concepts(self, embeddings: torch.Tensor, dtype, device, batch: int) -> torch.Tensor:
        """The concept tokens [batch, T, width] entering the first block, embedded like the prompt."""
        raise NotImplementedError

    def record_block(self, call, index: int, args: dict, captured: tuple) -> str:
        """Hand block `index`'s maps to `call.step.record_block` and advance `call.concept_state`.

        `args` are the replace patch's arguments, `captured` the (q, k, v, out) of the block's joint
        attention call. Returns "" or why this call cannot be recorded."""
        raise NotImplementedError

    # ------------------------------------------------------------------ concepts
    @classmethod
    def accepts_tokens(cls, tokens) -> bool:
        """Whether a CLIP's tokenizer output (a dict of streams) is this family's text encoder."""
        raise NotImplementedError

    @classmethod
    def encode_concepts(cls, clip, names: list[str]):
        """The ConceptSet of `names` (parsed, non-empty) through this family's text encoder,
        tagged with `encoder=cls.family`; AnchorDiffError when they do not fit."""
        raise NotImplementedError

    # ------------------------------------------------------------------ defaults
    def default_graph_layers(self) -> tuple[int, ...]:
        raise NotImplementedError

    def default_seg4diff_layer(self) -> int:
        raise NotImplementedError

    def defaults_note(self) -> str:
        """One line for tooltips and errors: where this family's defaults come from."""
        return ""


# SD3 Medium's paper layers (graph pair 9, 18 and Seg4Diff's expert layer 9 of blocks 0..23) as
# relative depths: the documented rule for families no paper gives layers for (docs/DESIGN.md).
SD3_GRAPH_DEPTHS = (9 / 23, 18 / 23)
SD3_SEG4DIFF_DEPTH = 9 / 23


def relative_layer(fraction: float, num_blocks: int) -> int:
    """The block at `fraction` of the depth, over blocks 0..num_blocks-1 in forward order."""
    return round(fraction * (num_blocks - 1))


class RelativeDepthDefaults:
    """Default layers for a family without published ones: SD3 Medium's paper layers at the same
    relative depth over all joint-attention blocks in forward order. Unmeasured on real weights."""

    def default_graph_layers(self) -> tuple[int, ...]:
        return tuple(sorted({relative_layer(f, self.num_blocks()) for f in SD3_GRAPH_DEPTHS}))

    def default_seg4diff_layer(self) -> int:
        return relative_layer(SD3_SEG4DIFF_DEPTH, self.num_blocks())


def split_image(q: torch.Tensor, text_len: int, grid_tokens: int) -> torch.Tensor:
    """The generated image's tokens of a text-first joint sequence [B, L, C]: reference-image tokens
    (Kontext, edit models) that follow the grid are left out."""
    return q[:, text_len:text_len + grid_tokens]


def flat_heads(t: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """[B, H, L, d] (heads_first) or [B, L, H, d] / [B, L, H*d] -> [B, L, H*d]."""
    if heads_first:
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def image_rows_lse(lse, rows: torch.Tensor, text_len: int, grid_tokens: int, keys: int):
    """The recorded rows' image queries' log-sum-exp [R, H, N] over the model's joint keys (the 5th
    item the recorder captures, or None), for StepRecorder.record_block's `lse_joint`: only where those
    keys are exactly the prompt and the image grid (`keys` = their number); with reference-image
    tokens among them (Kontext, edit models) the model's normaliser is not the recorder's, so None."""
    if lse is None or keys != text_len + grid_tokens:
        return None
    return lse[rows][:, :, text_len:text_len + grid_tokens]
