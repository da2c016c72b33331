"""AnchorDiff chooses, a segmenter cuts: anchors as point prompts and masks as boxes, in the formats
of ComfyUI's SAM3_Detect (positive_coords / negative_coords JSON, BOUNDING_BOX)."""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..anchordiff_core import pipeline
from ..anchordiff_core.prompts import anchor_points, mask_boxes, point_prompts
from .common import CATEGORY, Anchors, pick_concepts
from .errors import AnchorDiffError

# core's BOUNDING_BOX where the ComfyUI version has it (0.4+), the same socket type otherwise
BoundingBox = getattr(io, "BoundingBox", None) or io.Custom("BOUNDING_BOX")


class AnchorDiffSegmenterPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffSegmenterPrompts",
            display_name="AnchorDiff Points and Boxes (for SAM3)",
            category=CATEGORY,
            description=(
                "Hand AnchorDiff's choice to a point / box segmenter such as ComfyUI's SAM3 Detect: the concept's "
                "anchors as positive points, the other concepts' anchors as negative points (the look-alike), and "
                "the boxes of its mask. Pixels of the image, x across, y down."
            ),
            inputs=[
                Anchors.Input("anchors", tooltip="From 'AnchorDiff Anchor Select' (several anchors per concept with max_anchors > 1)."),
                io.String.Input("concept", default="", tooltip="The concept to cut: its name or number (1 = first). Empty = the first concept."),
                io.Mask.Input("mask", optional=True, tooltip="The concept's MASK from 'AnchorDiff Mask', for the boxes output (one box per connected part, largest first)."),
            ],
            outputs=[
                io.String.Output("positive_coords", display_name="positive_coords",
                                 tooltip="The concept's anchors as SAM3 point prompts: JSON [{\"x\": int, \"y\": int}, ...] in image pixels."),
                io.String.Output("negative_coords", display_name="negative_coords",
                                 tooltip="Every other concept's anchors, same format: SAM3 keeps the cut off them."),
                BoundingBox.Output("bboxes", display_name="bboxes",
                                   tooltip="Boxes of the mask's parts ({x, y, width, height}, pixels): a list for one image, a list per image for a batch. Empty without a mask."),
            ],
        )

    @classmethod
    def execute(cls, anchors: pipeline.Anchors, concept: str, mask=None) -> io.NodeOutput:
        maps = anchors.maps
        index = pick_concepts(maps.concepts, concept)[0]
        points = [anchor_points(rows, maps.grid, maps.image_size) for rows in anchors.indices]
        if len(points) > 1 and any(p != points[0] for p in points[1:]):
            raise AnchorDiffError(
                f"The batch has {len(points)} images with different anchors, but SAM3 takes one set of points for a whole "
                "batch: cut one image at a time (e.g. 'Image From Batch' before AnchorDiff), or use the bboxes output, which is per image.")
        positive, negative = point_prompts(points[0], index)
        boxes = []
        if mask is not None:
            m = mask if mask.dim() == 3 else mask[None]
            if tuple(m.shape[1:]) != tuple(maps.image_size):
                raise AnchorDiffError(f"The mask is {m.shape[2]}x{m.shape[1]} but the anchors belong to a "
                                      f"{maps.image_size[1]}x{maps.image_size[0]} image: connect the Mask node of the same run.")
            per_image = [mask_boxes(x) for x in m]
            boxes = per_image[0] if len(per_image) == 1 else per_image
        return io.NodeOutput(json.dumps(positive), json.dumps(negative), boxes)
