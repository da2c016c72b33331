"""The one registry of grounding methods: AnchorDiff and the published baselines.

Each method has a key (what results, caches and `pipeline.baseline_heat` use), a title (tables,
overlays) and, for a baseline, how its heat [K, N] comes from one image's recorded maps. Adding a
baseline is one entry here (plus its heat function in `baselines.py` and, for the canvas, a node in
nodes/baselines.py); `pipeline.baseline_heat`, `python -m anchordiff_eval` (its `--methods` and its
tables) read the list from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .baselines import concept_attention_heat, cross_attention_heat, seg4diff_heat

# heat(maps, image index, layers or None, softmax) -> [K, N]
BaselineHeat = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Method:
    key: str
    title: str
    heat: Optional[BaselineHeat] = None  # None: AnchorDiff itself (anchors + graph + propagation)
    needs: Optional[str] = None          # an AttentionMaps field that may be absent, e.g. "seg4diff"
    missing: str = ""                    # the error when `needs` is absent


def _seg4diff(maps, b: int, layers: Optional[Sequence[int]], softmax: bool) -> torch.Tensor:
    return seg4diff_heat(maps.seg4diff[b])


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("anchordiff", "AnchorDiff"),
    Method("cross_attention", "Cross-attention", lambda maps, b, layers, softmax: cross_attention_heat(maps.a_ci[b], layers)),
    Method("conceptattention", "ConceptAttention",
           lambda maps, b, layers, softmax: concept_attention_heat(maps.ca_scores[b], layers, softmax)),
    Method("seg4diff", "Seg4Diff", _seg4diff, needs="seg4diff",
           missing="This recording has no Seg4Diff map: set the recorder's Seg4Diff layer."),
)}
ANCHORDIFF = "anchordiff"
BASELINES = tuple(k for k, m in METHODS.items() if m.heat is not None)


def baseline(key: str) -> Method:
    method = METHODS.get(key)
    if method is None or method.heat is None:
        raise ValueError(f"unknown baseline '{key}'")
    return method
