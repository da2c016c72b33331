"""The toy SD3 inside a real ComfyUI, in-process, through this pack's own nodes.

    from toyworld.comfy_run import ToyComfy
    toy = ToyComfy()                                   # loads ComfyUI, the pack, the toy model
    maps = toy.look(scene.image, scene.caption, ["red circle", "circle"])   # AnchorDiff Look At Image
    image = toy.generate("a red circle on grass", seed=1)                    # KSampler + VAE Decode

Used by the quality measurements (toyworld.grounding, benchmarks/) so that every number comes from
the path users run: ComfyUI's loaders (UNETLoader's load_diffusion_model, VAELoader "taesd3"), the
toy CLIP through ComfyUI's CLIP object (the Concepts node and CLIPTextEncode), and the recording
patch. ComfyUI is found as the tests find it (toyworld/comfy_env.py).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from anchordiff_core.anchors import PIXELS_PER_LATENT

from .comfy_env import REPO_ROOT as REPO, get_nodes, import_comfy, load_custom_node_pack, set_models_dir

WEIGHTS = Path(__file__).resolve().parent / "weights"
MODEL_FILE = "toy_sd3.safetensors"
VAE_FILES = ("taesd3_encoder.safetensors", "taesd3_decoder.safetensors")
_MODEL_DIRS: list = []   # the temporary models folders of every ToyComfy of this process


def link_toy_models(models_dir, weights: Path = WEIGHTS) -> Path:
    """models_dir/diffusion_models/toy_sd3.safetensors and models_dir/vae_approx/taesd3_* -> the
    committed weights (what a user would copy into ComfyUI/models)."""
    models_dir = Path(models_dir)
    for sub, name in [("diffusion_models", MODEL_FILE)] + [("vae_approx", f) for f in VAE_FILES]:
        src = Path(weights) / name
        if not src.is_file():
            raise FileNotFoundError(f"{src} is missing: train it with python -m toyworld.train_vae / train_dit")
        dst = models_dir / sub / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        os.symlink(src.resolve(), dst)
    return models_dir


class ToyComfy:
    def __init__(self, weights: Path = WEIGHTS, models_dir=None, dtype: torch.dtype | None = None):
        """`dtype`: the diffusion model's weights and compute dtype (None: ComfyUI's choice, float32
        on a CPU). torch.bfloat16 runs the model as ComfyUI does a bf16 model on a GPU: loaded in bf16
        and computed in bf16 (on a CPU ComfyUI would compute a bf16 model in float32 by manual cast;
        the ModelComputeDtype node's patch, set_model_compute_dtype, turns that off)."""
        import_comfy()
        self.nodes = get_nodes(extras=True)
        if not any(k.startswith("AnchorDiff") and k != "AnchorDiffTestCLIP" for k in self.nodes.NODE_CLASS_MAPPINGS):
            assert load_custom_node_pack(REPO), "the AnchorDiff pack failed to load"
        if models_dir is None:
            # ComfyUI keeps this folder first in its model lists for the rest of the process, so it
            # must outlive this object: removed at exit, not when a ToyComfy is garbage-collected
            tmp = tempfile.TemporaryDirectory(prefix="toy-models-")
            _MODEL_DIRS.append(tmp)
            models_dir = tmp.name
        link_toy_models(models_dir, weights)
        set_models_dir(models_dir)
        from .comfy_clip import make_fixture_clip
        import comfy.sd
        self.N = self.nodes.NODE_CLASS_MAPPINGS
        self.model = comfy.sd.load_diffusion_model(str(Path(models_dir) / "diffusion_models" / MODEL_FILE),
                                                   {} if dtype is None else {"dtype": dtype})
        if dtype is not None and self.model.model.manual_cast_dtype not in (None, dtype):
            self.model.set_model_compute_dtype(dtype)
        self.vae = self.nodes.VAELoader().load_vae("taesd3")[0]
        self.clip = make_fixture_clip(context=True)

    # --- nodes -----------------------------------------------------------------------
    def run(self, node_id: str, *args, **kwargs):
        return self.N[node_id].execute(*args, **kwargs).args

    def encode_text(self, text: str):
        return self.nodes.CLIPTextEncode().encode(self.clip, text)[0]

    def concepts(self, names) -> object:
        return self.run("AnchorDiffConcepts", self.clip, ", ".join(names) if not isinstance(names, str) else names)[0]

    def latent(self, image_u8: np.ndarray) -> dict:
        pixels = torch.from_numpy(np.ascontiguousarray(image_u8)).float()[None] / 255.0
        return self.nodes.VAEEncode().encode(self.vae, pixels)[0]

    def look(self, image_u8: np.ndarray, caption: str, concepts, record_at: float = 0.5, graph_layers: str = "",
             seg4diff_layer: int = -1, seed: int = 0, latent: dict | None = None, anchor_maps: str | None = None):
        """AnchorDiff Look At Image on an RGB uint8 image; returns AttentionMaps. `concepts`: names, or
        the output of `self.concepts(names)`; `latent`: `self.latent(image_u8)` if already encoded;
        `anchor_maps`: the node's anchor_maps choice (None: its default)."""
        cs = concepts if hasattr(concepts, "embeddings") else self.concepts(concepts)
        latent = self.latent(image_u8) if latent is None else latent
        extra = {} if anchor_maps is None else {"anchor_maps": anchor_maps}
        return self.run("AnchorDiffLookAtImage", self.model, cs, self.encode_text(caption), latent,
                        seed, record_at, graph_layers, seg4diff_layer, **extra)[0]

    def generate(self, caption: str, seed: int = 0, size: int = 256, steps: int = 20, cfg: float = 5.0,
                 negative: str = "", model=None) -> tuple[np.ndarray, dict]:
        """KSampler (euler, sgm_uniform: the workflows' settings) + VAE Decode -> uint8 image, LATENT."""
        latent = {"samples": torch.zeros(1, 16, size // PIXELS_PER_LATENT, size // PIXELS_PER_LATENT)}
        out = self.nodes.KSampler().sample(model or self.model, seed, steps, cfg, "euler", "sgm_uniform",
                                           self.encode_text(caption), self.encode_text(negative), latent)[0]
        image = self.nodes.VAEDecode().decode(self.vae, out)[0]
        return (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy(), out
