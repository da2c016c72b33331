"""The toy SD3 (toyworld/) as one loader node, so the templates can be tried without SD3 weights.

Registered only where the toy's weights are present (a checkout or an archive of this repository:
toyworld/weights/); a registry install ships without them (.comfyignore) and simply has no such node.
Nothing is downloaded: the weights are the committed files.
"""
from __future__ import annotations

from pathlib import Path

import torch

import comfy.sd
import comfy.utils
from comfy_api.latest import io

TOY_DIR = Path(__file__).resolve().parents[1] / "toyworld"
WEIGHTS = TOY_DIR / "weights"
MODEL_FILE = WEIGHTS / "toy_sd3.safetensors"
VAE_FILES = {"taesd_encoder": WEIGHTS / "taesd3_encoder.safetensors",
             "taesd_decoder": WEIGHTS / "taesd3_decoder.safetensors"}
# SD3's latent scale and shift, as ComfyUI's VAELoader sets them for "taesd3"
TAESD3_SCALE_SHIFT = (1.5305, 0.0609)


def available() -> bool:
    return MODEL_FILE.is_file() and all(p.is_file() for p in VAE_FILES.values())


def load_toy_vae() -> comfy.sd.VAE:
    sd = {}
    for prefix, path in VAE_FILES.items():
        sd.update({f"{prefix}.{k}": v for k, v in comfy.utils.load_torch_file(str(path)).items()})
    sd["vae_scale"], sd["vae_shift"] = (torch.tensor(v) for v in TAESD3_SCALE_SHIFT)
    return comfy.sd.VAE(sd=sd)


class AnchorDiffToySD3(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AnchorDiffToySD3",
            display_name="AnchorDiff Toy SD3 (demo model)",
            category="AnchorDiff/demo",
            description=(
                "The small SD3 trained on toyworld's shapes (toyworld/README.md): SD3's architecture at depth 4, "
                "its toy text encoder and TAESD3-style VAE, from the files shipped in toyworld/weights. For trying "
                "the AnchorDiff templates without SD3 weights: it knows 5 shapes, 8 colours and 4 grounds "
                "('a red circle and an orange circle on grass') at 256 x 256; record at 0.85."
            ),
            inputs=[],
            outputs=[
                io.Model.Output("model", display_name="MODEL", tooltip="The toy SD3 (depth 4): connect to the sampler or Record Attention."),
                io.Clip.Output("clip", display_name="CLIP", tooltip="The toy's text encoder (CLIP-L/G token stand-in, no T5)."),
                io.Vae.Output("vae", display_name="VAE", tooltip="The toy's VAE (TAESD with 16 channels)."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        from ..toyworld.comfy_clip import make_fixture_clip
        model = comfy.sd.load_diffusion_model(str(MODEL_FILE))
        return io.NodeOutput(model, make_fixture_clip(context=True), load_toy_vae())
