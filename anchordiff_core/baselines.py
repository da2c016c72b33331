"""The published baselines, each returning heat [K, N] (min-max per concept) like AnchorDiff.

- raw cross-attention: concept-to-image attention A_CI averaged over layers;
- ConceptAttention (Helbling et al., ICML 2025): attention-output-space dot products between image
  and concept output vectors, concept vectors L2-normalised, softmax over concepts per layer, mean
  over layers;
- Seg4Diff (Kim et al., NeurIPS 2025): the expert layer's image-query -> text-key attention.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .attention import group_mean, mean_over_layers
from .graph import normalize_rows
from .propagation import minmax_rows


def cross_attention_heat(a_ci_layers: torch.Tensor, layers: Optional[Sequence[int]] = None) -> torch.Tensor:
    """[L, K, N] per-layer A_CI -> [K, N]: mean over the selected layers (default all)."""
    return minmax_rows(mean_over_layers(a_ci_layers.float(), layers))


def concept_attention_scores(
    image_out: torch.Tensor, concept_out: torch.Tensor, token_concept: torch.Tensor, num_concepts: int
) -> torch.Tensor:
    """One layer's ConceptAttention logits [B, K, N] = o_x . normalize(o_c).

    image_out [B, N, D] and concept_out [B, T, D] are attention outputs before the output
    projection (heads concatenated); a concept's tokens are averaged before normalising.
    """
    concepts = group_mean(concept_out.float(), token_concept, num_concepts, dim=1)
    concepts = normalize_rows(concepts.reshape(-1, concepts.shape[-1])).view_as(concepts)
    return torch.matmul(concepts, image_out.float().transpose(1, 2))


def concept_attention_heat(
    scores_layers: torch.Tensor, layers: Optional[Sequence[int]] = None, softmax: bool = True
) -> torch.Tensor:
    """[L, K, N] per-layer logits -> [K, N]: softmax over concepts per layer, mean over layers.

    With a single concept the softmax is constant (the paper's "ConceptAttention (single)" row);
    pass softmax=False, or add background concepts, to get a usable map.
    """
    scores = scores_layers.float()
    if softmax:
        scores = scores.softmax(dim=1)
    return minmax_rows(mean_over_layers(scores, layers))


def seg4diff_heat(expert_map: torch.Tensor) -> torch.Tensor:
    """[K, N] image-to-concept attention of the expert layer -> min-max heat."""
    return minmax_rows(expert_map.float())
