"""Nodes that encode concepts and record attention maps (while sampling, or from an existing image)."""
from __future__ import annotations

import torch

import comfy.sample
import comfy.samplers
from comfy_api.latest import io, ui

from ..anchordiff_core.recorder import RECORD_PRECISIONS, RecordSpec
from . import model_patch
from .common import CATEGORY, Concepts, Maps, Recorder, finite_inputs, user_errors
from .errors import AnchorDiffError, parse_layers
from .models import adapter_for
from .model_patch import AttentionRecorder, RecordSettings
from .text import encode_concepts

GRAPH_LAYERS_TIP = (
    "Joint blocks whose image self-attention builds the graph (comma-separated, 0-based). Empty = the paper's "
    "defaults: SD3 Medium 9, 18; SD3.5 Large 23, 31; SD3.5 Medium 14, 19 (our choice, see docs/DESIGN.md); Flux.1 22, 44 "
    "(our rule, unmeasured; its double-stream blocks are 0-18, the single-stream blocks 19-56)."
)
PRECISION_TIP = (
    "auto: exact on a CPU; fast on a GPU when its maps fit in a quarter of the free GPU memory (fast changed no mask "
    "on the toy benchmark), else exact. exact: the maps in float32 throughout, kept where ComfyUI keeps intermediates. fast (for GPUs): the image "
    "self-attention output through the fused attention kernel in the model's dtype, TF32 scores with float32 "
    "sums (a fused Triton kernel for the head mean when triton is installed), maps kept on the GPU; slower than "
    "exact on a CPU. compact: fast, and the image self-attention map stored in float16 (half the memory; may "
    "flip a few gate edges). See docs/DESIGN.md."
)
SEG4DIFF_TIP = "Joint block for the Seg4Diff baseline map; -1 = block 9 on SD3 Medium (Seg4Diff's expert layer), same relative depth elsewhere (Flux.1: 22)."


class AnchorDiffConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffConcepts",
            display_name="AnchorDiff Concepts",
            category=CATEGORY,
            description="Encode the concepts to find (e.g. 'cat, dog' or one per line) with the model's own text encoders (SD3 / SD3.5 or Flux.1).",
            inputs=[
                io.Clip.Input("clip", tooltip="The model's text encoders. SD3 / SD3.5: TripleCLIPLoader or the CLIP of an SD3 checkpoint. Flux.1: DualCLIPLoader (clip_l, t5xxl, type flux)."),
                io.String.Input(
                    "concepts", multiline=True, default="cat, dog",
                    tooltip="Concepts to mask, separated by commas or new lines. Several words per concept are fine ('red car').",
                ),
            ],
            outputs=[Concepts.Output("encoded", display_name="concepts", tooltip="Encoded concepts for the recording nodes.")],
        )

    @classmethod
    def execute(cls, clip, concepts) -> io.NodeOutput:
        return io.NodeOutput(encode_concepts(clip, concepts))


# What Anchor Select can pool: the paper's A_CI per block only (nothing more recorded), or also the
# image-to-concept map at every block for the consensus anchor (RecordSpec.ic_blocks).
# The default is the consensus anchor's (docs/DESIGN.md "Consensus anchor", "Default": it won on the toy's test
# split at both recording points and both image sizes measured); the paper's is one click away.
ANCHOR_MAPS = {"concept→image (paper)": False, "all blocks, both directions (consensus)": True}
DEFAULT_ANCHOR_MAPS = "all blocks, both directions (consensus)"
ANCHOR_MAPS_TIP = (
    "Maps recorded for Anchor Select. all blocks, both directions (default): also every block's image→concept map, for "
    "Anchor Select's default 'consensus' anchor: per concept 4 bytes x blocks x image tokens more (SD3 Medium at 1024 px: "
    "0.4 MB) and one extra image-attention pass per block of the recorded step. concept→image (paper): only the paper's "
    "maps (enough for its argmax anchor; the consensus then pools the blocks' concept→image maps and the Seg4Diff map)."
)


def _anchor_maps(choice: str) -> bool:
    if choice not in ANCHOR_MAPS:
        raise AnchorDiffError(f"anchor_maps must be one of {', '.join(ANCHOR_MAPS)}; got '{choice}'.")
    return ANCHOR_MAPS[choice]


def _record_spec(model, concepts, graph_layers: str, seg4diff_layer: int, precision: str = "auto", ic_blocks: bool = False):
    adapter = adapter_for(model)
    if concepts is None:
        raise AnchorDiffError("No concepts connected: add an 'AnchorDiff Concepts' node.")
    variant = adapter.variant()
    encoder = getattr(concepts, "encoder", "")
    if encoder and encoder != adapter.family:
        raise AnchorDiffError(
            f"The concepts were encoded with the text encoders of {encoder}, but the model is {variant}: "
            f"connect the CLIP that goes with this model ({adapter.family}) to 'AnchorDiff Concepts'."
        )
    width = adapter.context_width()
    if concepts.embeddings.shape[1] != width:
        raise AnchorDiffError(
            f"The concepts were encoded with width {concepts.embeddings.shape[1]}, but this model expects {width}: "
            f"use the text encoders of {adapter.family}."
        )
    depth = adapter.num_blocks()
    layers = parse_layers(graph_layers, depth, "graph_layers", f"this {variant}") or adapter.default_graph_layers()
    if seg4diff_layer >= depth:
        raise AnchorDiffError(f"seg4diff_layer {seg4diff_layer} out of range: this {variant} has {depth} joint blocks (0..{depth - 1}).")
    seg = adapter.default_seg4diff_layer() if seg4diff_layer < 0 else seg4diff_layer
    spec = user_errors(RecordSpec, concepts.names, concepts.token_concept, depth, layers, seg, precision=precision, ic_blocks=ic_blocks)
    return spec, variant


def _common_inputs():
    return [
        io.String.Input("graph_layers", default="", tooltip=GRAPH_LAYERS_TIP),
        io.Int.Input("seg4diff_layer", default=-1, min=-1, max=63, tooltip=SEG4DIFF_TIP),
    ]


class AnchorDiffRecordAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffRecordAttention",
            display_name="AnchorDiff Record Attention",
            category=CATEGORY,
            description=(
                "Patch an SD3 / SD3.5 or Flux.1 model so the sampler records AnchorDiff's attention maps at one denoising step. "
                "Connect MODEL to your sampler, then the sampler's LATENT and 'recorder' to 'AnchorDiff Read Maps'. "
                "The generated image is unchanged."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD3 / SD3.5 model (Medium, Large, Large Turbo) or a Flux.1 model (dev, schnell, Kontext)."),
                Concepts.Input("concepts", tooltip="From 'AnchorDiff Concepts'."),
                io.Float.Input(
                    "record_at", default=0.5, min=0.01, max=0.99, step=0.01,
                    tooltip="Where in the trajectory to record, as a fraction of the noise schedule (0.5 = the paper's midpoint). "
                    "The sampled step whose noise level is nearest to it is recorded; 'AnchorDiff Read Maps' shows which.",
                ),
                io.Int.Input("record_step", default=-1, min=-1, max=10000, tooltip="-1: use record_at. Otherwise record this sampled step, counted from 0: record_step 2 is "
                             "the step the sampler's progress bar shows as 3/4 (Read Maps shows both)."),
                *_common_inputs(),
                io.Int.Input("keep_runs", default=2, min=1, max=16, tooltip="How many sampling runs' maps to keep in memory."),
                io.Combo.Input("precision", options=list(RECORD_PRECISIONS), default="auto", optional=True, tooltip=PRECISION_TIP),
                io.Combo.Input("anchor_maps", options=list(ANCHOR_MAPS), default=DEFAULT_ANCHOR_MAPS, optional=True, tooltip=ANCHOR_MAPS_TIP),
            ],
            outputs=[
                io.Model.Output("patched_model", display_name="model", tooltip="The patched model: connect it to the sampler."),
                Recorder.Output("recorder", display_name="recorder", tooltip="Connect to 'AnchorDiff Read Maps' together with the sampler's LATENT."),
            ],
        )

    @classmethod
    def execute(cls, model, concepts, record_at, record_step, graph_layers, seg4diff_layer, keep_runs, precision="auto",
                anchor_maps=DEFAULT_ANCHOR_MAPS) -> io.NodeOutput:
        finite_inputs(cls, record_at=record_at)
        spec, _variant = _record_spec(model, concepts, graph_layers, seg4diff_layer, precision, _anchor_maps(anchor_maps))
        recorder = AttentionRecorder(concepts, spec, RecordSettings(record_at, record_step, keep_runs), adapter_for(model))
        return io.NodeOutput(recorder.attach(model), recorder)


class AnchorDiffReadMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffReadMaps",
            display_name="AnchorDiff Read Maps",
            category=CATEGORY,
            description="The attention maps recorded while the sampler produced this LATENT (never those of another run).",
            inputs=[
                Recorder.Input("recorder", tooltip="From 'AnchorDiff Record Attention'."),
                io.Latent.Input("latent", tooltip="The LATENT output of the sampler that used the recording MODEL."),
            ],
            outputs=[Maps.Output("maps", display_name="maps", tooltip="Recorded maps for Anchor Select, Build Gated Graph and the baselines.")],
        )

    @classmethod
    def execute(cls, recorder, latent) -> io.NodeOutput:
        if not isinstance(recorder, AttentionRecorder):
            raise AnchorDiffError("'recorder' must come from 'AnchorDiff Record Attention'.")
        maps = recorder.maps_for(latent["samples"])
        return io.NodeOutput(maps, ui=ui.PreviewText(recorded_text(maps)))


def recorded_text(maps) -> str:
    """Which step and noise level the maps come from, for the node's output text and the log."""
    asked = f" ({maps.meta['asked']})" if maps.meta.get("asked") else ""
    return f"recorded {model_patch.step_text(maps.step, maps.meta.get('sampled_steps'))} at sigma {maps.sigma:.4f}{asked}"


class AnchorDiffLookAtImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffLookAtImage",
            display_name="AnchorDiff Look At Image",
            category=CATEGORY,
            description=(
                "Record AnchorDiff's maps for an existing image: its latent (VAE Encode) is noised to the trajectory's "
                "midpoint with the given seed and the model looks at it once with the given conditioning."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD3 / SD3.5 or Flux.1 model."),
                Concepts.Input("concepts", tooltip="From 'AnchorDiff Concepts'."),
                io.Conditioning.Input("positive", tooltip="A prompt describing the image (CLIP Text Encode)."),
                io.Latent.Input("latent", tooltip="The image's latent, from VAE Encode."),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                    tooltip="Seed of the added noise (fixed: the same image gives the same maps).",
                ),
                io.Float.Input(
                    "record_at", default=0.5, min=0.01, max=0.99, step=0.01,
                    tooltip="Noise level as a fraction of the trajectory (0.5 = the paper's midpoint).",
                ),
                *_common_inputs(),
                io.Combo.Input("anchor_maps", options=list(ANCHOR_MAPS), default=DEFAULT_ANCHOR_MAPS, optional=True, tooltip=ANCHOR_MAPS_TIP),
            ],
            outputs=[Maps.Output("maps", display_name="maps", tooltip="Recorded maps for Anchor Select, Build Gated Graph and the baselines.")],
        )

    @classmethod
    def execute(cls, model, concepts, positive, latent, seed, record_at, graph_layers, seg4diff_layer,
                anchor_maps=DEFAULT_ANCHOR_MAPS) -> io.NodeOutput:
        finite_inputs(cls, record_at=record_at)
        spec, _variant = _record_spec(model, concepts, graph_layers, seg4diff_layer, ic_blocks=_anchor_maps(anchor_maps))
        if not positive:
            raise AnchorDiffError("'positive' conditioning is empty: connect a CLIP Text Encode describing the image.")
        recorder = AttentionRecorder(concepts, spec, RecordSettings(record_at=record_at, keep_runs=1), adapter_for(model))
        patched = recorder.attach(model)
        samples = comfy.sample.fix_empty_latent_channels(patched, latent["samples"])
        sigma = float(patched.get_model_object("model_sampling").percent_to_sigma(record_at))
        sigmas = torch.tensor([sigma, 0.0])
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        # one Euler step from sigma to 0 = exactly one model evaluation at sigma, cond only (cfg 1)
        comfy.sample.sample_custom(
            patched, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas, positive, positive, samples,
            noise_mask=latent.get("noise_mask"), seed=seed,
        )
        maps = recorder.last_run_maps()
        return io.NodeOutput(maps)
