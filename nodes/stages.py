"""The four stages of AnchorDiff as nodes: Anchor Select, Build Gated Graph, Propagate, Mask.
(Named "stages", not "steps": a step is one propagation iteration, the Propagate node's `steps`.)"""
from __future__ import annotations

import comfy.model_management
from comfy_api.latest import io

from ..anchordiff_core import pipeline
from ..anchordiff_core import auto
from ..anchordiff_core.anchors import ANCHOR_SMOOTH_SHARE, PIXELS_PER_TOKEN, REGION_MAX_ANCHORS, REGION_MIN_RELATIVE_SCORE
from ..anchordiff_core.masks import EDGE_RADIUS
from . import preview
from .common import (
    CATEGORY, MAPS_TIP, PREVIEW_SCHEMA, Anchors, Graph, Heat, Maps, check_image, finite_inputs, heat_preview, parse_block_list,
    pick_concepts, preview_ui, progress_callback, search_aliases, used_when, user_errors,
)
from .errors import AnchorDiffError

MANUAL_TIP = (
    "Manual anchors, one per line: 'concept: x, y' in image pixels (concept name or number), e.g. 'cat: 512, 300'. "
    "Click the preview to place one. Concepts not listed stay automatic. Clear to go back to automatic."
)


def _anchor_points(anchors: pipeline.Anchors):
    """Per image, per concept: anchor centres in image pixels (for the preview markers)."""
    _, w = anchors.maps.grid
    size, half = PIXELS_PER_TOKEN, PIXELS_PER_TOKEN / 2
    out = []
    for indices in anchors.indices:
        out.append([[((t % w) * size + half, (t // w) * size + half) for t in row.tolist() if t >= 0] for row in indices])
    return out


ANCHOR_FROM = {
    "concept→image (paper)": "concept_to_image",
    "image→concept": "image_to_concept",
    "consensus (blocks agree, both directions)": "consensus",
    "consensus, smoothed (region peak)": "consensus_smoothed",
}
# The default since it won on the toy's test split at both recording points and sizes measured (docs/DESIGN.md
# "Consensus anchor", "Default" and "Smoothed"); the paper's argmax is one click away, and workflows saved with
# the unsmoothed consensus keep it.
DEFAULT_ANCHOR_FROM = "consensus, smoothed (region peak)"
# Multi-anchor with Propagate keeping only the mask's regions that hold an anchor (anchors.REGION_*, auto.py's
# auto_min_distance; docs/DESIGN.md, "Anchor regions"). -1 is min_distance's "auto" on the float widget.
DEFAULT_MAX_ANCHORS, DEFAULT_MIN_RELATIVE_SCORE, AUTO_MIN_DISTANCE = REGION_MAX_ANCHORS, REGION_MIN_RELATIVE_SCORE, -1.0


class AnchorDiffAnchorSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffAnchorSelect",
            **PREVIEW_SCHEMA,
            display_name="AnchorDiff Anchor Select",
            **search_aliases("Anchor Select", "anchor point", "click anchor"),
            category=CATEGORY,
            description=(
                "Pick each concept's anchors: the peaks of the blocks' agreed attention in both directions, smoothed over the "
                "image (consensus, the default; up to 3 separated peaks, for several instances), of concept-to-image attention "
                "(the paper: anchor_from 'concept→image (paper)', max_anchors 1), or points you place by clicking the preview."
            ),
            inputs=[
                Maps.Input("maps", tooltip=MAPS_TIP),
                io.Int.Input(
                    "max_anchors", default=DEFAULT_MAX_ANCHORS, min=1, max=16,
                    tooltip="Up to this many separated peaks per concept (several instances); the first is always the peak. "
                    "1 = the paper's single argmax. The default 3 with Propagate's 'regions holding an anchor' reaches a phrase's "
                    "other instances without spreading onto look-alikes (docs/DESIGN.md, 'Anchor regions').",
                ),
                io.Float.Input(
                    "min_distance", default=AUTO_MIN_DISTANCE, min=AUTO_MIN_DISTANCE, max=256.0, step=0.5,
                    tooltip=f"Multi-anchor: minimum distance between anchors, in tokens (16 px each). -1 = auto: "
                    f"{auto.ANCHOR_SEPARATION_SHARE:g} of the token grid's side (8 tokens at 1024 px, 4 at 512, 2 at 256).",
                ),
                io.Float.Input(
                    "min_relative_score", default=DEFAULT_MIN_RELATIVE_SCORE, min=0.0, max=1.0, step=0.01,
                    tooltip="Multi-anchor: a further anchor must score at least this fraction of the concept's peak.",
                ),
                io.String.Input("manual_anchors", default="", multiline=True, tooltip=MANUAL_TIP),
                io.Boolean.Input("exclude_last_block", default=False, tooltip="Average concept attention without the last (pre_only) block, whose text queries are never trained."),
                io.Image.Input("image", optional=True, tooltip="Optional: the image, shown under the preview."),
                io.Combo.Input(
                    "anchor_from", options=list(ANCHOR_FROM), default=DEFAULT_ANCHOR_FROM, optional=True,
                    tooltip="consensus, smoothed (default): the consensus map blurred over the image (a Gaussian of "
                    f"{ANCHOR_SMOOTH_SHARE:.0%} of the token grid's side) before its peak is taken, so the anchor sits inside the region the maps agree on, not on "
                    "one edge token. consensus: every block's map but the last's, both directions, each weighted by how well it "
                    "agrees with the others (label-free; full accuracy with the recorder's anchor_maps 'all blocks, both "
                    "directions', its default; else A_CI blocks + the Seg4Diff map; ignores exclude_last_block; docs/DESIGN.md). "
                    "concept→image (paper): the paper's argmax of concept-to-image attention, averaged over blocks. "
                    "image→concept: image queries' attention to each concept at the recorder's Seg4Diff layer.",
                ),
            ],
            outputs=[Anchors.Output("anchors", display_name="anchors", tooltip="Anchors for 'Propagate'.")],
        )

    @classmethod
    def execute(cls, maps, max_anchors, min_distance, min_relative_score, manual_anchors, exclude_last_block, image=None,
                anchor_from=DEFAULT_ANCHOR_FROM) -> io.NodeOutput:
        finite_inputs(cls, min_distance=min_distance, min_relative_score=min_relative_score)
        if min_distance < 0 and min_distance != AUTO_MIN_DISTANCE:
            raise AnchorDiffError(f"min_distance must be -1 (auto) or a distance in tokens >= 0; got {min_distance:g}.")
        distance = auto.AUTO if min_distance == AUTO_MIN_DISTANCE else min_distance
        source = ANCHOR_FROM.get(anchor_from)
        if source is None:
            raise AnchorDiffError(f"anchor_from must be one of {', '.join(ANCHOR_FROM)}; got '{anchor_from}'.")
        anchors = user_errors(pipeline.pick_anchors, maps, max_anchors, distance, min_relative_score, manual_anchors,
                              exclude_last_block, source)
        if source in ("consensus", "consensus_smoothed"):
            looked_at = user_errors(pipeline.consensus_heat, maps, source)
        elif source == "image_to_concept":
            looked_at = pipeline.baseline_heat(maps, "seg4diff")
        else:
            looked_at = pipeline.baseline_heat(maps, "cross_attention", pipeline.anchor_layers(maps, exclude_last_block) or ())
        soft = pipeline.heat_masks(looked_at, soft=True)
        image = check_image(image, maps.batch_size)
        ui = heat_preview(cls, soft, maps.concepts, maps.image_size, image, _anchor_points(anchors), anchors.manual)
        return io.NodeOutput(anchors, ui=ui)


PAPER_GATE, PAPER_STEPS = f"{auto.PAPER_GATE_PERCENTILE:g}", f"{auto.PAPER_STEPS}"  # "98", "160" (auto.py is their home)
CUSTOM = "custom"  # the choice that uses the node's own value widget
GATE_SETTINGS = {"auto": auto.AUTO, f"paper ({PAPER_GATE}th percentile)": auto.PAPER, CUSTOM: None}
STEPS_SETTINGS = {"auto": auto.AUTO, f"paper ({PAPER_STEPS} steps)": auto.PAPER, CUSTOM: None}
KEEP = {"regions holding an anchor": "anchor_regions", "everywhere (paper)": "everywhere"}
DEFAULT_KEEP = "regions holding an anchor"
AUTO_TIP = "(measured on the toy world at 128-1024 px: README, 'Gate and steps at other image sizes')"


def _setting(choice: str, custom, options: dict, what: str):
    if choice not in options:
        raise AnchorDiffError(f"{what} must be one of {', '.join(options)}; got '{choice}'.")
    return custom if options[choice] is None else options[choice]


class AnchorDiffBuildGatedGraph(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffBuildGatedGraph",
            display_name="AnchorDiff Build Gated Graph",
            **search_aliases("Build Gated Graph", "affinity graph"),
            category=CATEGORY,
            description="Build the sparse affinity graph: output-space similarity, gated by row-wise attention similarity (auto: sized to the image; the paper keeps the top 2% of pairs at 1024 px).",
            inputs=[
                Maps.Input("maps", tooltip=MAPS_TIP),
                used_when(
                    io.Float.Input("gate_percentile", default=auto.PAPER_GATE_PERCENTILE, min=0.0, max=100.0, step=0.1, tooltip=f"Used when gate_setting is 'custom': keep pairs whose attention-row similarity is above this percentile ({PAPER_GATE} = the paper's top {100 - auto.PAPER_GATE_PERCENTILE:g}%)."),
                    gate_setting=[CUSTOM], gate=[True],
                ),
                io.String.Input("layers", default="", tooltip="Recorded graph layers to average (e.g. '9' for one); empty = all recorded."),
                io.Boolean.Input("gate", default=True, tooltip="Off = the paper's 'w/o gate' ablation (dense, leaks onto look-alikes; slow)."),
                io.Combo.Input(
                    "gate_setting", options=list(GATE_SETTINGS), default="auto", optional=True,
                    tooltip="The gate's percentile. auto = keep the paper's 81.92 neighbours per token, but at most 1/16 of "
                    f"the tokens: the {PAPER_GATE}th percentile at 1024 x 1024 px, 93.75th at 576 px and smaller " + AUTO_TIP + ". paper = the "
                    f"{PAPER_GATE}th percentile at every size (about 5 neighbours per token at 256 px). custom = the gate_percentile value.",
                ),
            ],
            outputs=[Graph.Output("graph", display_name="graph", tooltip="Graph for 'Propagate'.")],
        )

    @classmethod
    def execute(cls, maps, gate_percentile, layers, gate, gate_setting="auto") -> io.NodeOutput:
        finite_inputs(cls, gate_percentile=gate_percentile)
        chosen = parse_block_list(layers, maps, "layers")
        percentile = _setting(gate_setting, gate_percentile, GATE_SETTINGS, "gate_setting")
        graphs = user_errors(
            pipeline.build_graphs, maps, percentile if gate else None, chosen,
            comfy.model_management.get_torch_device(), progress_callback(maps.batch_size),
            comfy.model_management.throw_exception_if_processing_interrupted,
        )
        return io.NodeOutput(graphs)


class AnchorDiffPropagate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffPropagate",
            **PREVIEW_SCHEMA,
            display_name="AnchorDiff Propagate",
            **search_aliases("Propagate", "heat diffusion"),
            category=CATEGORY,
            description="Spread each anchor over the gated graph (all concepts at once) into a heat map per concept.",
            inputs=[
                Graph.Input("graph", tooltip="From 'Build Gated Graph'."),
                Anchors.Input("anchors", tooltip="From 'Anchor Select' (same maps as the graph)."),
                used_when(
                    io.Int.Input("steps", default=auto.PAPER_STEPS, min=0, max=10000, tooltip="Used when steps_setting is 'custom': propagation steps. More spreads further and leaks more."),
                    steps_setting=[CUSTOM],
                ),
                io.Combo.Input(
                    "steps_setting", options=list(STEPS_SETTINGS), default="auto", optional=True,
                    tooltip=f"Propagation steps. auto = {auto.STEPS_PER_SIDE:g} per token-grid side: {PAPER_STEPS} at 1024 x 1024 px, 40 at 256 px (the masks "
                    "settle within 10-20 steps at every size) " + AUTO_TIP + f". paper = {PAPER_STEPS} at every size. custom = the steps value.",
                ),
                io.Combo.Input(
                    "keep", options=list(KEEP), default=DEFAULT_KEEP, optional=True,
                    tooltip="regions holding an anchor (default): the heat stays only on the parts of each concept's mask that "
                    "contain one of its anchors, so heat the graph carried onto a separate look-alike object is dropped "
                    "(docs/DESIGN.md, 'Anchor regions'). everywhere (paper): the propagated heat as it is.",
                ),
            ],
            outputs=[Heat.Output("heat", display_name="heat", tooltip="Heat maps for 'Mask'.")],
        )

    @classmethod
    def execute(cls, graph, anchors, steps, steps_setting="auto", keep=None) -> io.NodeOutput:
        steps = user_errors(auto.steps_for, _setting(steps_setting, steps, STEPS_SETTINGS, "steps_setting"), graph.maps.grid)
        total = graph.maps.batch_size * max(steps, 1)
        where = _setting(DEFAULT_KEEP if keep is None else keep, None, KEEP, "keep")
        heat = user_errors(pipeline.propagate_anchors, graph, anchors, steps, progress_callback(total), where)
        soft = pipeline.heat_masks(heat, soft=True)
        ui = heat_preview(cls, soft, heat.concepts, heat.image_size, None, _anchor_points(anchors), anchors.manual)
        return io.NodeOutput(heat, ui=ui)


class AnchorDiffMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffMask",
            **PREVIEW_SCHEMA,
            display_name="AnchorDiff Mask",
            **search_aliases("Mask", "concept mask", "segment", "segmentation"),
            category=CATEGORY,
            description="Turn heat maps (AnchorDiff or a baseline) into ComfyUI MASKs at image resolution.",
            inputs=[
                Heat.Input("heat", tooltip="From 'Propagate' or a baseline node."),
                io.String.Input("concept", default="", tooltip="Which concept: its name (any case) or number (1-based). Empty = all, as a batch (image-major: image 1's concepts, then image 2's...)."),
                io.Combo.Input("threshold", options=["mean", "otsu", "fixed"], default="mean", tooltip="mean = the paper (above the map's mean); otsu = automatic two-class split; fixed = the value below."),
                used_when(io.Float.Input("fixed_threshold", default=0.5, min=0.0, max=1.0, step=0.01, tooltip="Threshold for 'fixed' (heat is in 0..1)."), threshold=["fixed"]),
                io.Boolean.Input(
                    "refine_edges", default=True, optional=True,
                    tooltip="Snap the mask to the image's edges (guided filter of the heat by the image) instead of 16 px token "
                    "blocks, when 'image' is connected; without an image the mask keeps its token blocks. On by default: "
                    "better boundaries and IoU on the toy world at 256 and 512 px (README).",
                ),
                used_when(io.Int.Input("edge_radius", default=EDGE_RADIUS, min=1, max=256, optional=True, tooltip="Edge refinement window radius in pixels (16 = one token)."), refine_edges=[True]),
                io.Image.Input("image", optional=True, tooltip="Optional: the image, shown under the preview; needed by refine_edges."),
            ],
            outputs=[
                io.Mask.Output("mask", display_name="mask", tooltip="Binary MASK [B, H, W], 1 = the concept."),
                io.Mask.Output("soft_mask", display_name="soft_mask", tooltip="The heat map resized to the image, 0..1, for feathered edits."),
            ],
        )

    @classmethod
    def execute(cls, heat, concept, threshold, fixed_threshold, image=None, refine_edges=True, edge_radius=EDGE_RADIUS) -> io.NodeOutput:
        finite_inputs(cls, fixed_threshold=fixed_threshold)
        picked = pick_concepts(heat.concepts, concept)
        rule = fixed_threshold if threshold == "fixed" else threshold
        image = check_image(image, heat.values.shape[0])
        guide = image if refine_edges else None   # no image: nothing to snap to, the token-block mask
        masks = user_errors(pipeline.heat_masks, heat, rule, False, guide, edge_radius)  # [B, K, H, W]
        soft = user_errors(pipeline.heat_masks, heat, soft=True, image=guide, edge_radius=edge_radius)
        pictures = [
            preview.mask_overlay(masks[b], heat.concepts, None if image is None else image[min(b, image.shape[0] - 1)])
            for b in range(masks.shape[0])
        ]
        ui = preview_ui(cls, pictures, preview.layout(heat.concepts, heat.image_size, 1))
        height, width = masks.shape[-2:]
        return io.NodeOutput(
            masks[:, picked].reshape(-1, height, width).contiguous(),
            soft[:, picked].reshape(-1, height, width).contiguous(),
            ui=ui,
        )
