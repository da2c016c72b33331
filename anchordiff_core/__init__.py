"""AnchorDiff: training-free concept grounding for MM-DiTs, as pure torch functions.

    anchors = select_anchors(a_ci)                         # [K, N] -> LongTensor [K]
    graph   = build_gated_graph(a_ii, o_ii, gate_percentile=98.0)
    heat    = propagate(graph, anchors, steps=160)         # [K, N] in [0, 1]
    mask    = to_mask(heat, grid=(h, w), size=(H, W))      # [K, H, W] float32 0/1

No ComfyUI import anywhere in this package (the HTTP client for ComfyUI servers is the separate
package `anchordiff_client`).  Names are imported on first use (PEP 562).
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "anchors": ["agreement_weights", "anchor_seeds", "consensus_anchors", "consensus_map", "point_to_token", "select_anchors", "weighted_map"],
    "auto": ["auto_gate_percentile", "auto_min_distance", "auto_steps"],
    "attention": ["group_mean", "image_self_attention", "key_column_attention", "mean_over_layers", "multihead_attention", "query_key_attention"],
    "baselines": ["concept_attention_heat", "concept_attention_scores", "cross_attention_heat", "seg4diff_heat"],
    "graph": ["GatedGraph", "build_gated_graph", "cosine_similarity_rows", "percentile"],
    "maps": ["AttentionMaps"],
    "masks": ["otsu_thresholds", "refine_edges", "refined_soft_map", "soft_map", "to_mask"],
    "metrics": ["BinarySegmentationMeter", "MultiConceptMeter", "average_precision"],
    "propagation": ["anchor_regions", "minmax_rows", "propagate"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'anchordiff_core' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cached: later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
