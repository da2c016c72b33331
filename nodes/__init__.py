"""ComfyUI glue for AnchorDiff (V3 node schema). The algorithm lives in anchordiff_core."""
from comfy_api.latest import ComfyExtension, io

from .baselines import AnchorDiffConceptAttentionHeat, AnchorDiffCrossAttentionHeat, AnchorDiffSeg4DiffHeat
from .record import AnchorDiffConcepts, AnchorDiffLookAtImage, AnchorDiffReadMaps, AnchorDiffRecordAttention
from .stages import AnchorDiffAnchorSelect, AnchorDiffBuildGatedGraph, AnchorDiffMask, AnchorDiffPropagate
from .segmenter import AnchorDiffSegmenterPrompts
from . import toy

NODES = [
    AnchorDiffConcepts,
    AnchorDiffRecordAttention,
    AnchorDiffReadMaps,
    AnchorDiffLookAtImage,
    AnchorDiffAnchorSelect,
    AnchorDiffBuildGatedGraph,
    AnchorDiffPropagate,
    AnchorDiffMask,
    AnchorDiffSegmenterPrompts,
    AnchorDiffCrossAttentionHeat,
    AnchorDiffConceptAttentionHeat,
    AnchorDiffSeg4DiffHeat,
] + ([toy.AnchorDiffToySD3] if toy.available() else [])  # the demo model, where its weights are shipped


class AnchorDiffExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> AnchorDiffExtension:
    return AnchorDiffExtension()
