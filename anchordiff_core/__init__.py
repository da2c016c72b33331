"""AnchorDiff: training-free concept grounding for MM-DiTs, as pure torch functions.

    anchors = select_anchors(a_ci)                         # [K, N] -> LongTensor [K]
    graph   = build_gated_graph(a_ii, o_ii, gate_percentile=98.0)
    heat    = propagate(graph, anchors, steps=160)         # [K, N] in [0, 1]
    mask    = to_mask(heat, grid=(h, w), size=(H, W))      # [K, H, W] float32 0/1

No ComfyUI import anywhere in this package.
"""
from .anchors import anchor_seeds, point_to_token, select_anchors
from .attention import (
    attention,
    group_mean,
    image_self_attention,
    key_column_attention,
    mean_over_layers,
    query_key_attention,
)
from .baselines import concept_attention_heat, concept_attention_scores, cross_attention_heat, seg4diff_heat
from .graph import GatedGraph, build_gated_graph, cosine_similarity_rows, percentile
from .maps import AttentionMaps
from .masks import otsu_thresholds, soft_map, to_mask
from .metrics import BinarySegmentationMeter, MultiConceptMeter, average_precision
from .propagate import minmax_rows, propagate

__version__ = "0.1.0"

__all__ = [
    "AttentionMaps",
    "BinarySegmentationMeter",
    "MultiConceptMeter",
    "average_precision",
    "GatedGraph",
    "anchor_seeds",
    "attention",
    "build_gated_graph",
    "concept_attention_heat",
    "concept_attention_scores",
    "cosine_similarity_rows",
    "cross_attention_heat",
    "group_mean",
    "image_self_attention",
    "key_column_attention",
    "mean_over_layers",
    "minmax_rows",
    "otsu_thresholds",
    "percentile",
    "point_to_token",
    "propagate",
    "query_key_attention",
    "select_anchors",
    "seg4diff_heat",
    "soft_map",
    "to_mask",
]
