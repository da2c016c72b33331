"""The container for everything recorded from one denoising step, per image."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch


@dataclass(frozen=True)
class AttentionMaps:
    """Maps recorded for a batch of B images (positive/conditional rows only), float32; with the
    recorder's fast / compact precisions o_ii is in the model's dtype, and with compact a_ii is
    float16 (recorder.map_dtypes).

    a_ci:       [B, L, K, N]  concept-to-image attention per joint block (eq. 5, heads averaged,
                              a concept's tokens averaged)
    ca_scores:  [B, L, K, N]  ConceptAttention logits per joint block (before softmax)
    a_ii:       [B, G, N, N]  image-to-image attention per graph layer (heads averaged)
    o_ii:       [B, G, N, D]  its output A_II V per graph layer (heads concatenated)
    seg4diff:   [B, K, N] or None  expert-layer image-to-concept attention
    ic:         [B, L, K, N] or None  the same image-to-concept map at every joint block (recorded
                              only for the consensus anchor: RecordSpec.ic_blocks)
    """

    concepts: tuple[str, ...]
    grid: tuple[int, int]
    image_size: tuple[int, int]
    a_ci: torch.Tensor
    ca_scores: torch.Tensor
    a_ii: torch.Tensor
    o_ii: torch.Tensor
    graph_layers: tuple[int, ...]
    seg4diff: Optional[torch.Tensor] = None
    seg4diff_layer: Optional[int] = None
    ic: Optional[torch.Tensor] = None
    num_blocks: int = 0
    sigma: float = float("nan")
    step: int = -1
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        b, layers, k, n = self.a_ci.shape
        h, w = self.grid
        if h * w != n:
            raise ValueError(f"grid {h}x{w} does not match {n} tokens")
        if k != len(self.concepts):
            raise ValueError(f"{k} concept maps for {len(self.concepts)} concept names")
        if self.a_ii.shape[:2] != (b, len(self.graph_layers)) or self.a_ii.shape[2:] != (n, n):
            raise ValueError(f"a_ii shape {tuple(self.a_ii.shape)} does not fit batch {b}, layers {self.graph_layers}, {n} tokens")

    @property
    def batch_size(self) -> int:
        return self.a_ci.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.a_ci.shape[-1]

    def graph_inputs(self, index: int, layers=None) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """A_II [N, N] and O_II [N, D] of image `index` per chosen layer (block indices; default all
        recorded): views into the recording, no copy; `build_gated_graph` averages them."""
        chosen = list(self.graph_layers) if not layers else [int(layer) for layer in layers]
        missing = [layer for layer in chosen if layer not in self.graph_layers]
        if missing:
            raise ValueError(
                f"graph layer(s) {missing} were not recorded; the recording has {list(self.graph_layers)}. "
                "Add them to the recorder's graph layers and sample again."
            )
        slots = [self.graph_layers.index(layer) for layer in chosen]
        return _compact_mean(self.a_ii[index], slots), _compact_mean(self.o_ii[index], slots)

    def select(self, indices) -> "AttentionMaps":
        """Maps of a subset of the batch, in the given order."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        seg = None if self.seg4diff is None else self.seg4diff[idx]
        ic = None if self.ic is None else self.ic[idx]
        return replace(self, a_ci=self.a_ci[idx], ca_scores=self.ca_scores[idx], a_ii=self.a_ii[idx], o_ii=self.o_ii[idx], seg4diff=seg, ic=ic)


def _compact_mean(per_layer: torch.Tensor, slots: list[int]) -> tuple[torch.Tensor, ...]:
    """Views of the chosen layers of a float32 recording; for one stored narrower (fast / compact
    precision: float16 / bfloat16) with several layers, their float32 mean as the one layer: one
    float32 buffer, where build_gated_graph would otherwise widen every layer to float32 first."""
    if per_layer.dtype == torch.float32 or len(slots) == 1:
        return tuple(per_layer[s] for s in slots)
    mean = per_layer[slots[0]].float()
    for s in slots[1:]:
        mean.add_(per_layer[s])
    return (mean.div_(len(slots)),)
