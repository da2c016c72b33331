"""ComfyUI in-process: load it from the user's folder, load this node pack through ComfyUI's own
custom-node loader, load the model files with comfy.sd, and record maps exactly as the nodes do
(AnchorDiff Concepts, CLIP Text Encode, VAE Encode, AnchorDiff Look At Image, then the pack's
pipeline: Anchor Select, Build Gated Graph, Propagate, and the baselines)."""
from __future__ import annotations

import asyncio
import importlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from anchordiff_core.anchors import REGION_MAX_ANCHORS, REGION_MIN_RELATIVE_SCORE
from anchordiff_core.auto import AUTO, PAPER_GATE_PERCENTILE, PAPER_STEPS, Setting
from anchordiff_core.methods import ANCHORDIFF, METHODS as REGISTRY

PACK_ROOT = Path(__file__).resolve().parents[1]  # this repository = the ComfyUI node pack


class SetupError(ValueError):
    """ComfyUI or a model file could not be loaded; the message says what to do."""


def run_async(coro):
    """asyncio.run, also from inside a running event loop (then in a helper thread). The one copy:
    toyworld.comfy_env (and through it the tests) uses this one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", asyncio.run(coro)))
    thread.start()
    thread.join()
    return out.get("result")


def load_comfyui(comfyui_dir, cpu: bool = False):
    """Import ComfyUI from `comfyui_dir` (once per process) and this pack through ComfyUI's
    custom-node loader; returns the pack's module (its `nodes` and `anchordiff_core` are the code
    ComfyUI runs)."""
    folder = Path(comfyui_dir).expanduser().resolve()
    if not (folder / "comfy" / "model_management.py").is_file() or not (folder / "nodes.py").is_file():
        raise SetupError(f"{folder} is not a ComfyUI folder (no comfy/model_management.py and nodes.py): pass --comfyui /path/to/ComfyUI")
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        where = Path(loaded.__file__ or next(iter(loaded.__path__))).resolve()
        if folder not in where.parents:
            raise SetupError(f"another ComfyUI ({where.parent}) is already imported in this process; run with --comfyui {where.parent}")
    if str(folder) in sys.path:
        sys.path.remove(str(folder))
    sys.path.insert(0, str(folder))  # ComfyUI's top-level `nodes`, `utils`, `folder_paths` first
    importlib.import_module("utils")  # as main.py: before `nodes`, whose import would shadow it with comfy/utils.py
    import comfy.cli_args

    if "comfy.model_management" not in sys.modules and cpu:
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import nodes

    name = str(PACK_ROOT).replace(".", "_x_")  # the module name ComfyUI's loader gives a pack folder
    if name not in sys.modules:
        if not run_async(nodes.load_custom_node(str(PACK_ROOT))):
            raise SetupError(f"ComfyUI could not load the AnchorDiff node pack at {PACK_ROOT} (see the log above)")
    return sys.modules[name]


def pack_module(pack, dotted: str):
    """The pack's submodule `dotted` (e.g. "nodes.record") as ComfyUI runs it. Through sys.modules,
    not attributes: a pack module that was loaded again in this process (a second
    load_custom_node) gets no attributes for submodules that were already imported."""
    return importlib.import_module(f"{pack.__name__}.{dotted}")


def sd3_variant(pack, model) -> str:
    """The SD3 / SD3.5 variant of a loaded MODEL, named by the pack's adapter; the evaluator measures
    SD3-family models only (the paper's), so any other family is refused here."""
    adapter = pack_module(pack, "nodes.models").adapter_for(model)
    if type(adapter).__name__ != "SD3Adapter":
        raise SetupError(f"the evaluator measures SD3 / SD3.5 models (the paper's backbone); the loaded model is "
                         f"{adapter.variant()}: pass an SD3 / SD3.5 checkpoint or diffusion model file")
    return adapter.variant()


def _callable(spec: str, what: str) -> Callable:
    """'package.module:function' -> the function."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise SetupError(f"{what} must look like 'package.module:function'; got '{spec}'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise SetupError(f"{what} '{spec}': {e}") from None


def _file(path, what: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SetupError(f"{what} {p} does not exist")
    return str(p.resolve())


@dataclass
class Models:
    model: object  # ModelPatcher of an SD3 / SD3.5 MMDiT
    clip: object  # comfy.sd.CLIP with SD3's text encoders
    vae: object  # comfy.sd.VAE
    description: str


def load_models(checkpoint=None, unet=None, text_encoders: Sequence[str] = (), vae=None,
                clip_from: Optional[str] = None, vae_from: Optional[str] = None) -> Models:
    """The model files as ComfyUI's loaders read them: a full checkpoint (Load Checkpoint), or a
    diffusion model (Load Diffusion Model) with --text-encoders (TripleCLIPLoader) and --vae.
    `clip_from` / `vae_from` ('module:function' returning a CLIP / VAE) replace the files (tests)."""
    import comfy.sd
    import comfy.utils

    if (checkpoint is None) == (unet is None):
        raise SetupError("give exactly one of --checkpoint (a full SD3 / SD3.5 checkpoint) and --unet (a diffusion model file)")
    clip = vae_obj = None
    if checkpoint is not None:
        path = _file(checkpoint, "--checkpoint")
        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=vae is None and vae_from is None,
                                                    output_clip=not text_encoders and clip_from is None)
        model, clip, vae_obj = out[0], out[1], out[2]
        description = Path(path).name
    else:
        path = _file(unet, "--unet")
        model = comfy.sd.load_diffusion_model(path)
        description = Path(path).name
    if model is None:
        raise SetupError(f"{description} holds no diffusion model")
    if text_encoders:
        files = [_file(f, "--text-encoders") for f in text_encoders]
        clip = comfy.sd.load_clip(ckpt_paths=files, clip_type=comfy.sd.CLIPType.SD3)
    elif clip_from:
        clip = _callable(clip_from, "--clip-from")()
    if clip is None:
        raise SetupError(
            f"{description} has no text encoders (SD3.5 checkpoints and diffusion-model files do not): pass "
            "--text-encoders clip_l.safetensors clip_g.safetensors [t5xxl_fp16.safetensors]"
        )
    if vae is not None:
        vae_obj = comfy.sd.VAE(sd=comfy.utils.load_torch_file(_file(vae, "--vae")))
        vae_obj.throw_exception_if_invalid()
    elif vae_from:
        vae_obj = _callable(vae_from, "--vae-from")()
    if vae_obj is None:
        raise SetupError(f"{description} has no VAE: pass --vae sd3_vae.safetensors (SD3's 16-channel VAE)")
    return Models(model, clip, vae_obj, description)


@dataclass(frozen=True)
class RecordOptions:
    """What the nodes' widgets would be set to. Defaults: the paper's protocol (98th-percentile gate, 160
    steps: anchordiff_core.auto.PAPER_*), not the nodes' defaults ("auto", which equals the paper's values
    at 1024 x 1024 px); `gate_percentile` and `steps` also take "auto" or "paper" (resolved per image size)."""
    record_at: float = 0.5
    seed: int = 0
    graph_layers: str = ""  # '' = the model's defaults (Record / Look At Image nodes)
    seg4diff_layer: int = -1
    gate_percentile: Setting = PAPER_GATE_PERCENTILE
    steps: Setting = PAPER_STEPS
    exclude_last_block: bool = False
    anchor_from: str = "paper"  # ANCHOR_FROM: "paper" (A_CI argmax), "consensus" or "consensus-smoothed" (the nodes'
    # default; docs/DESIGN.md "Consensus anchor")
    anchor_regions: bool = False  # the nodes' default: up to anchors.REGION_MAX_ANCHORS separated peaks (auto distance,
    # REGION_MIN_RELATIVE_SCORE), Propagate keeping the regions that hold an anchor (docs/DESIGN.md "Anchor regions")


ANCHOR_FROM = {"paper": ("concept_to_image", "concept→image (paper)"),
               "consensus": ("consensus", "all blocks, both directions (consensus)"),
               "consensus-smoothed": ("consensus_smoothed", "all blocks, both directions (consensus)")}


class NodeRecorder:
    """Runs one image through the nodes' code path and returns every method's heat."""

    METHODS = tuple(REGISTRY)  # the registry: anchordiff_core.methods

    def __init__(self, pack, models: Models, options: RecordOptions):
        import comfy.model_management
        import nodes

        self.pack, self.models, self.options = pack, models, options
        self.nodes = nodes
        self.pipeline = pack_module(pack, "anchordiff_core.pipeline")
        self.device = comfy.model_management.get_torch_device()
        self.variant = sd3_variant(pack, models.model)
        self._concepts: dict = {}
        self._prompts: dict = {}

    def _encoded(self, concepts: Sequence[str]):
        key = tuple(concepts)
        if key not in self._concepts:
            node = pack_module(self.pack, "nodes.record").AnchorDiffConcepts
            self._concepts = {key: node.execute(self.models.clip, "\n".join(concepts)).args[0]}
        return self._concepts[key]

    def _positive(self, prompt: str):
        if prompt not in self._prompts:
            self._prompts = {prompt: self.nodes.CLIPTextEncode().encode(self.models.clip, prompt)[0]}
        return self._prompts[prompt]

    def record(self, image: np.ndarray, concepts: Sequence[str], prompt: str, methods: Sequence[str]):
        """image [S, S, 3] uint8 at the model's resolution -> ({method: heat [K, N]}, anchors [K, M], maps)."""
        o = self.options
        pixels = torch.from_numpy(np.array(image, dtype=np.float32)).div(255)[None]
        latent = self.nodes.VAEEncode().encode(self.models.vae, pixels)[0]
        look = pack_module(self.pack, "nodes.record").AnchorDiffLookAtImage
        source, anchor_maps = ANCHOR_FROM[o.anchor_from]
        maps = look.execute(self.models.model, self._encoded(concepts), self._positive(prompt), latent, o.seed,
                            o.record_at, o.graph_layers, o.seg4diff_layer, anchor_maps).args[0]
        pl = self.pipeline
        heats, anchor_tokens = {}, None
        for method in methods:
            if method == ANCHORDIFF:
                multi = dict(max_anchors=REGION_MAX_ANCHORS, min_distance=AUTO, min_relative_score=REGION_MIN_RELATIVE_SCORE)
                anchors = pl.pick_anchors(maps, exclude_last_block=o.exclude_last_block, source=source,
                                          **(multi if o.anchor_regions else {}))
                graphs = pl.build_graphs(maps, o.gate_percentile, (), self.device)
                keep = "anchor_regions" if o.anchor_regions else "everywhere"
                heats[method] = pl.propagate_anchors(graphs, anchors, o.steps, keep=keep).values[0]
                anchor_tokens = anchors.indices[0]
            else:
                heats[method] = pl.baseline_heat(maps, method).values[0]
        return heats, anchor_tokens, maps
