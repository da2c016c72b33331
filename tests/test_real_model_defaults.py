"""The real models' defaults, at the real models' sizes (shape only: the meta device, no weights).

The tiny test models (depth 2..3) never reach the branches for SD3 Medium, SD3.5 Medium and SD3.5
Large. Here checkpoints of the real architectures (depth, width, qk-norm, MMDiT-X layers, position
embedding size as published) are built as shape-only state dicts, detected by ComfyUI's own
model detection, instantiated from what it detected, and our variant name and every default is
pinned: graph layers, Seg4Diff layer, anchor layers.
"""
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# name: (depth, qk_norm, MMDiT-X layers, pos_embed_max_size), as in the published checkpoints
REAL_MODELS = {
    "SD3 Medium": (24, None, (), 192),
    "SD3.5 Medium": (24, "rms", tuple(range(13)), 384),
    "SD3.5 Large": (38, "rms", (), 192),  # and SD3.5 Large Turbo
}
# variant: (graph layers, Seg4Diff layer, anchor layers without the last block)
DEFAULTS = {
    "SD3 Medium": ((9, 18), 9, list(range(23))),
    "SD3.5 Medium": ((14, 19), 9, list(range(23))),
    "SD3.5 Large": ((23, 31), 14, list(range(37))),
}


@pytest.fixture(scope="module")
def pack(comfy):
    from toyworld import comfy_env

    comfy_env.get_nodes(extras=False)
    assert comfy_env.load_custom_node_pack(REPO)
    return comfy_env.pack_module(REPO)


def shape_only_checkpoint(depth, qk_norm, x_layers, pos_size) -> dict:
    """A diffusion-model state dict of the real architecture, every tensor on the meta device."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    hidden = 64 * depth
    model = MMDiT(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=depth, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": hidden}},
        num_patches=pos_size * pos_size, pos_embed_max_size=pos_size, pos_embed_scaling_factor=None,
        qk_norm=qk_norm, x_block_self_attn_layers=list(x_layers), dtype=torch.float16, device="meta",
        operations=comfy.ops.disable_weight_init,
    )
    return model.state_dict()


def detected_model(state_dict):
    """What ComfyUI's loader does with such a file: detect the config, build the MMDiT (on meta)."""
    import comfy.model_detection
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    config = comfy.model_detection.model_config_from_unet(state_dict, "")
    assert type(config) is comfy.supported_models.SD3, type(config)
    unet = dict(config.unet_config)
    unet.pop("image_model", None)
    dm = MMDiT(**unet, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
    return config, dm


def sd3_adapter(pack, dm):
    """The adapter the pack picks for this MMDiT, as the nodes pick it (from a MODEL holding it)."""
    adapter = sys.modules[pack.__name__ + ".nodes.models"].adapter_for(types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=dm)))
    assert type(adapter).__name__ == "SD3Adapter"
    return adapter


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_comfyui_detects_the_real_architectures_and_our_defaults_follow(pack, name):
    depth, qk_norm, x_layers, pos_size = REAL_MODELS[name]
    config, dm = detected_model(shape_only_checkpoint(depth, qk_norm, x_layers, pos_size))
    assert config.unet_config["depth"] == depth and len(dm.joint_blocks) == depth
    assert config.unet_config.get("qk_norm") == qk_norm
    assert sorted(config.unet_config["x_block_self_attn_layers"]) == list(x_layers)
    assert dm.joint_blocks[0].x_block.attn.num_heads == depth  # heads = depth (64 features each)

    adapter = sd3_adapter(pack, dm)
    graph, seg, anchor = DEFAULTS[name]
    assert adapter.variant() == name
    assert adapter.default_graph_layers() == graph
    assert adapter.default_seg4diff_layer() == seg

    # through the Record node's own spec: empty graph_layers and seg4diff_layer -1 mean the defaults
    record = sys.modules[pack.__name__ + ".nodes.record"]
    from anchordiff_core.concepts import ConceptSet

    cs = ConceptSet(("cat", "dog"), torch.zeros(3, 4096), torch.tensor([0, 1, 1]))
    model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=dm))
    spec, variant = record._record_spec(model, cs, "", -1)
    assert (variant, spec.graph_layers, spec.seg4diff_layer, spec.num_blocks) == (name, graph, seg, depth)
    assert record._record_spec(model, cs, "3, 7", 5)[0].graph_layers == (3, 7)  # typed layers win

    # anchor layers: every joint block (the paper), or all but the last (pre_only) one
    from anchordiff_core import pipeline

    maps = types.SimpleNamespace(num_blocks=spec.num_blocks)
    assert pipeline.anchor_layers(maps, False) is None
    assert pipeline.anchor_layers(maps, True) == anchor
    assert dm.joint_blocks[-1].context_block.pre_only and not dm.joint_blocks[-2].context_block.pre_only


def test_other_depths_get_the_same_relative_layers(pack):
    _, dm = detected_model(shape_only_checkpoint(12, None, (), 64))
    adapter = sd3_adapter(pack, dm)
    assert adapter.variant() == "SD3-architecture model with 12 blocks"
    assert adapter.default_graph_layers() == (4, 9)  # 9/23 and 18/23 of the way through 0..11
    assert adapter.default_seg4diff_layer() == 4


# --------------------------------------------------------------------------------------- Flux.1
@pytest.mark.parametrize("guidance, name", [(True, "Flux.1 dev"), (False, "Flux.1 schnell")])
def test_real_flux1_is_detected_and_our_rule_gives_its_defaults(pack, guidance, name):
    """Flux.1 dev / schnell at the published shape (width 3072, 24 heads, 19 double + 38 single blocks),
    built by ComfyUI's own detection on meta tensors: the adapter's name, block order and the
    documented default-layer rule (SD3 Medium's 9 / 18 of 0..23 at the same relative depth of 0..56)."""
    import dataclasses

    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.flux.model import Flux, FluxParams

    extra = {"txt_ids_dims": []} if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)} else {}
    source = Flux(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                  num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                  qkv_bias=True, guidance_embed=guidance, dtype=torch.bfloat16, device="meta",
                  operations=comfy.ops.disable_weight_init, **extra)
    state_dict = {k.replace("norm.weight", "norm.scale"): v for k, v in source.state_dict().items()}
    config = comfy.model_detection.model_config_from_unet(state_dict, "")
    assert type(config).__name__ == ("Flux" if guidance else "FluxSchnell")
    unet = dict(config.unet_config)
    unet.pop("image_model", None)
    dm = Flux(**unet, dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init)
    adapter = sys.modules[pack.__name__ + ".nodes.models"].adapter_for(types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=dm)))
    assert adapter.variant() == name
    assert (adapter.num_blocks(), adapter.heads(), adapter.width()) == (57, 24, 3072)
    assert adapter.block_keys()[18:20] == [("double_block", 18), ("single_block", 0)]
    assert adapter.default_graph_layers() == (22, 44) and adapter.default_seg4diff_layer() == 22
