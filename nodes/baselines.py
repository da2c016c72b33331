"""The published baselines as nodes; each outputs the same HEAT type, so 'Mask' serves all."""
from __future__ import annotations

from comfy_api.latest import io

from ..anchordiff_core import pipeline
from .common import BASELINE_CATEGORY, MAPS_TIP, PREVIEW_SCHEMA, Heat, Maps, check_image, heat_preview, parse_block_list, user_errors

LAYERS_TIP = "Joint blocks to average (comma-separated, 0-based); empty = all blocks."


def _heat_output(cls, heat: pipeline.Heat, image) -> io.NodeOutput:
    soft = pipeline.heat_masks(heat, soft=True)
    image = check_image(image, heat.values.shape[0])
    return io.NodeOutput(heat, ui=heat_preview(cls, soft, heat.concepts, heat.image_size, image))


def _image_input():
    return io.Image.Input("image", optional=True, tooltip="Optional: the image, shown under the preview.")


class AnchorDiffCrossAttentionHeat(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffCrossAttentionHeat",
            **PREVIEW_SCHEMA,
            display_name="Cross-Attention Heat (AnchorDiff baseline)",
            category=BASELINE_CATEGORY,
            description="Raw concept-to-image attention, averaged over heads and blocks, as a heat map.",
            inputs=[Maps.Input("maps", tooltip=MAPS_TIP), io.String.Input("layers", default="", tooltip=LAYERS_TIP), _image_input()],
            outputs=[Heat.Output("heat", display_name="heat", tooltip="Heat maps for 'Mask'.")],
        )

    @classmethod
    def execute(cls, maps, layers, image=None) -> io.NodeOutput:
        heat = user_errors(pipeline.baseline_heat, maps, "cross_attention", parse_block_list(layers, maps))
        return _heat_output(cls, heat, image)


class AnchorDiffConceptAttentionHeat(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffConceptAttentionHeat",
            **PREVIEW_SCHEMA,
            display_name="ConceptAttention Heat (AnchorDiff baseline)",
            category=BASELINE_CATEGORY,
            description=(
                "ConceptAttention (Helbling et al., 2025): image and concept attention outputs compared by dot product, "
                "softmax over concepts per block, averaged over blocks. Needs several concepts (e.g. add 'background')."
            ),
            inputs=[
                Maps.Input("maps", tooltip=MAPS_TIP),
                io.Boolean.Input("softmax", default=True, tooltip="Softmax over concepts (the method). With one concept it is constant: turn off or add concepts."),
                io.String.Input("layers", default="", tooltip=LAYERS_TIP),
                _image_input(),
            ],
            outputs=[Heat.Output("heat", display_name="heat", tooltip="Heat maps for 'Mask'.")],
        )

    @classmethod
    def execute(cls, maps, softmax, layers, image=None) -> io.NodeOutput:
        heat = user_errors(pipeline.baseline_heat, maps, "conceptattention", parse_block_list(layers, maps), softmax)
        return _heat_output(cls, heat, image)


class AnchorDiffSeg4DiffHeat(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffSeg4DiffHeat",
            **PREVIEW_SCHEMA,
            display_name="Seg4Diff Heat (AnchorDiff baseline)",
            category=BASELINE_CATEGORY,
            description="Seg4Diff (Kim et al., 2025): image-to-text attention of the expert block (set on the recorder).",
            inputs=[Maps.Input("maps", tooltip=MAPS_TIP), _image_input()],
            outputs=[Heat.Output("heat", display_name="heat", tooltip="Heat maps for 'Mask'.")],
        )

    @classmethod
    def execute(cls, maps, image=None) -> io.NodeOutput:
        return _heat_output(cls, user_errors(pipeline.baseline_heat, maps, "seg4diff"), image)
