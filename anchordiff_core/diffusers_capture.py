"""What every diffusers recorder shares (diffusers_sd3.py, diffusers_flux.py, ...; no ComfyUI).

A diffusers recorder runs one forward pass of a diffusers transformer with its own attention
processor on every recorded block, a pre-hook keeping each block's inputs and a post-hook that
hands the block's maps to the StepRecorder and advances the concept stream. This base holds that
set-up (the RecordSpec, the hooks and processors, put in place and always removed, the concept
tokens through the model's text embedder, the AttentionMaps at the end) so that a backbone's
recorder only says how its attention and its concept stream are computed.
"""
from __future__ import annotations

import contextlib
import uuid
from typing import Callable, Optional, Sequence

import torch

from .concepts import ConceptSet
from .maps import AttentionMaps
from .recorder import RecordSpec, StepRecorder


class DiffusersRecorder:
    """Subclasses call `super().__init__` with the number of recorded blocks and use `_hooked`,
    `_initial_concepts` and `_finish` in their `record`."""

    def __init__(self, transformer, concepts: ConceptSet, num_blocks: int, graph_layers: Sequence[int],
                 seg4diff_layer: Optional[int] = None, store_device=None):
        self.transformer = transformer
        self.concepts = concepts
        self.spec = RecordSpec(concepts.names, concepts.token_concept, num_blocks, tuple(graph_layers), seg4diff_layer)
        self.store_device = store_device

    def _step(self, heads: int) -> StepRecorder:
        return StepRecorder(self.spec, heads, self.store_device)

    def _initial_concepts(self, embedder: torch.nn.Module, like: torch.Tensor, batch: int) -> torch.Tensor:
        """The concept tokens [batch, T, width] through the model's text embedder, as the prompt's
        (on `like`'s device, in its dtype)."""
        emb = self.concepts.embeddings.to(device=like.device, dtype=like.dtype)[None]
        return embedder(emb).expand(batch, -1, -1).contiguous()

    @staticmethod
    @contextlib.contextmanager
    def _hooked(blocks: Sequence[torch.nn.Module], processor: Callable[[int], object],
                pre: Callable[[int, torch.nn.Module, tuple, dict], None],
                post: Callable[[int, torch.nn.Module], None]):
        """While inside: block i's attention runs `processor(i)`, `pre(i, block, args, kwargs)` runs
        before block i and `post(i, block)` after it. Everything is put back on leaving, also on errors."""
        saved = [block.attn.processor for block in blocks]
        handles = []

        def pre_hook(index):
            return lambda module, args, kwargs: pre(index, module, args, kwargs)

        def post_hook(index):
            return lambda module, args, kwargs, output: post(index, module)

        try:
            for i, block in enumerate(blocks):
                block.attn.set_processor(processor(i))
                handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
                handles.append(block.register_forward_hook(post_hook(i), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for block, original in zip(blocks, saved):
                block.attn.set_processor(original)

    @staticmethod
    def _finish(step: StepRecorder, batch: int, grid: tuple[int, int], image_size: tuple[int, int], sigma: float) -> AttentionMaps:
        return step.finish(torch.arange(batch), batch, grid=tuple(grid), image_size=tuple(image_size), sigma=sigma,
                           meta={"id": uuid.uuid4().hex, "source": "diffusers"})
