"""Tests of the test fixtures: tiny SD3 models, fixture CLIP and VAE, ComfyUI import."""
import sys

import pytest
import torch

from fixtures import tiny_sd3
from fixtures.tiny_sd3 import VARIANTS

EXPECTED = {  # what ComfyUI's detection must read back from each file
    "tiny_sd3": dict(depth=2, qk_norm=None, x_block_self_attn_layers=()),
    "tiny_sd35": dict(depth=2, qk_norm="rms", x_block_self_attn_layers=()),
    "tiny_sd35m": dict(depth=3, qk_norm="rms", x_block_self_attn_layers=(0, 1)),
}


# --- ComfyUI in-process ---------------------------------------------------------

def test_import_comfy_is_idempotent_and_cpu(comfy):
    from toyworld.comfy_env import comfyui_dir, get_nodes, import_comfy, is_stub
    assert import_comfy() is comfy and import_comfy() is comfy
    assert sys.path[0] == str(comfyui_dir())
    import comfy.model_management as mm
    assert mm.cpu_state == mm.CPUState.CPU and mm.get_torch_device().type == "cpu"
    nodes = get_nodes()
    assert nodes.__file__.startswith(str(comfyui_dir()))
    assert {"UNETLoader", "VAELoader", "CLIPTextEncode", "KSampler", "ModelSamplingSD3",
            "EmptySD3LatentImage"} <= set(nodes.NODE_CLASS_MAPPINGS)
    import utils.install_util  # noqa: F401  (ComfyUI's utils package, not comfy/utils.py)
    import torchvision
    if is_stub("torchvision"):
        assert "transformers" in sys.modules  # imported before the stub went in
        from torchvision.models import efficientnet_v2_s
        with pytest.raises(AttributeError):
            efficientnet_v2_s().features
    else:
        assert hasattr(torchvision, "__file__")


def test_comfyui_dir_env_override(monkeypatch, tmp_path):
    from toyworld.comfy_env import comfyui_dir
    monkeypatch.setenv("ANCHORDIFF_COMFYUI_DIR", str(tmp_path))
    assert comfyui_dir() == tmp_path.resolve()


# --- tiny SD3 -------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_tiny_model_loads_as_sd3(comfy_models_dir, name):
    path = comfy_models_dir / "diffusion_models" / f"{name}.safetensors"
    patcher = tiny_sd3.load_with_comfy(path)
    info = tiny_sd3.describe_comfy_model(patcher)
    assert info["is_sd3"] and info["model_class"] == "SD3"
    assert {k: info[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert info["pos_embed_max_size"] == 96 and info["dtype"] == torch.float32
    tiny_sd3.load_with_comfy(path, expect=VARIANTS[name])
    with pytest.raises(AssertionError):
        tiny_sd3.load_with_comfy(path, expect=tiny_sd3.TinySD3Config(depth=4))

    # The loader is strict=False: prove every tensor of the live model came from the file.
    from safetensors.torch import load_file
    saved = load_file(str(path))
    live = patcher.model.diffusion_model.state_dict()
    assert set(live) == set(saved)
    for k, v in saved.items():
        assert torch.isfinite(v).all(), k
        assert torch.equal(live[k], v), k


def test_weights_deterministic_and_seeded():
    a = tiny_sd3.comfy_state_dict(tiny_sd3.SD3_PLAIN)
    b = tiny_sd3.comfy_state_dict(tiny_sd3.SD3_PLAIN)
    c = tiny_sd3.comfy_state_dict(tiny_sd3.TinySD3Config(depth=2, seed=7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["joint_blocks.0.x_block.attn.qkv.weight"], c["joint_blocks.0.x_block.attn.qkv.weight"])
    rms = tiny_sd3.comfy_state_dict(tiny_sd3.SD35_QKNORM)["joint_blocks.0.x_block.attn.ln_q.weight"]
    assert torch.isfinite(rms).all() and 1.0 < rms.mean() < 2.5  # set, not torch.empty garbage


def test_activations_stay_order_one_at_1024px(comfy_models_dir):
    """1024x1024 px = 128x128 latent = 64x64 tokens, within pos_embed_max_size 96."""
    patcher = tiny_sd3.load_with_comfy(comfy_models_dir / "diffusion_models" / "tiny_sd35m.safetensors")
    stds = []
    hooks = [b.register_forward_hook(lambda m, i, o: stds.append(o[1].std().item()))
             for b in patcher.model.diffusion_model.joint_blocks]
    x = tiny_sd3.random_inputs(1, 128, 128, 154, seed=3)
    try:
        out = tiny_sd3.comfy_forward(patcher, x["latent"], x["sigma"], x["context"], x["pooled"])
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (1, 16, 128, 128) and torch.isfinite(out).all()
    assert len(stds) == 3 and all(0.2 < s < 20 for s in stds), stds
    assert 0.2 < out.std().item() < 20


# --- ComfyUI vs diffusers ---------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_comfy_and_diffusers_agree(comfy_models_dir, name):
    cfg = VARIANTS[name]
    patcher = tiny_sd3.load_with_comfy(comfy_models_dir / "diffusion_models" / f"{name}.safetensors")
    dmodel = tiny_sd3.build_diffusers(cfg)
    # non-square latent (catches h/w mix-ups), batch 2, two CLIP chunks of text
    x = tiny_sd3.random_inputs(batch=2, height=32, width=48, text_tokens=154, seed=1)
    a = tiny_sd3.comfy_forward(patcher, x["latent"], x["sigma"], x["context"], x["pooled"])
    b = tiny_sd3.diffusers_forward(dmodel, x["latent"], x["sigma"], x["context"], x["pooled"])
    assert a.shape == b.shape == (2, 16, 32, 48)
    assert a.std() > 0.2
    assert (a - b).abs().max() < 1e-4

    # Negative control: the same comparison must notice a wrong timestep scale.
    with torch.no_grad():
        wrong = dmodel(hidden_states=x["latent"], encoder_hidden_states=x["context"],
                       pooled_projections=x["pooled"], timestep=x["sigma"], return_dict=False)[0]
    assert (a - wrong).abs().max() > 1e-2


def test_comfy_apply_model_matches_diffusers_denoised(comfy_models_dir):
    """The full ComfyUI model path (ModelSamplingDiscreteFlow: t = sigma*1000, denoised =
    x - sigma*v) against diffusers."""
    patcher = tiny_sd3.load_with_comfy(comfy_models_dir / "diffusion_models" / "tiny_sd35.safetensors")
    model = patcher.model
    sigma = torch.tensor([0.7])
    assert torch.allclose(model.model_sampling.timestep(sigma), sigma * 1000)
    x = tiny_sd3.random_inputs(batch=1, height=32, width=32, text_tokens=77, seed=2)
    with torch.no_grad():
        denoised = model.apply_model(x["latent"], sigma, c_crossattn=x["context"], y=x["pooled"])
    v = tiny_sd3.diffusers_forward(tiny_sd3.build_diffusers(tiny_sd3.SD35_QKNORM),
                                   x["latent"], sigma, x["context"], x["pooled"])
    assert (denoised - (x["latent"] - sigma * v)).abs().max() < 1e-4


def test_diffusers_key_map_round_trips_through_comfy(comfy):
    """Our ComfyUI->diffusers conversion, fed to ComfyUI's own diffusers->ComfyUI
    converter, gives back the original tensors exactly (fused qkv slices, scale/shift)."""
    from comfy.model_detection import convert_diffusers_mmdit
    cfg = tiny_sd3.SD35_MEDIUM_X
    sd = tiny_sd3.comfy_state_dict(cfg)
    dsd = tiny_sd3.to_diffusers_state_dict(sd, cfg.depth)
    assert "transformer_blocks.0.attn2.to_q.weight" in dsd and "transformer_blocks.2.attn2.to_q.weight" not in dsd
    back = convert_diffusers_mmdit(dict(dsd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# --- fixture CLIP ---------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_clip(comfy):
    from fixtures.fixture_clip import make_fixture_clip
    return make_fixture_clip()


def test_clip_shapes(fixture_clip, comfy):
    from fixtures.fixture_clip import make_fixture_clip
    cond, pooled = fixture_clip.encode_from_tokens(fixture_clip.tokenize("a photo of a cat"), return_pooled=True)
    assert cond.shape == (1, 77, 4096) and pooled.shape == (1, 2048)
    assert cond.dtype == torch.float32
    assert torch.count_nonzero(cond[0, :, 2048:]) == 0  # L+G = 2048, zero-padded to 4096
    long_prompt = " ".join(["cat"] * 100)  # 100 words: two 77-token CLIP chunks
    assert fixture_clip.encode_from_tokens(fixture_clip.tokenize(long_prompt)).shape == (1, 154, 4096)
    clip_t5 = make_fixture_clip(t5=True)
    t5_tokens = clip_t5.tokenize(long_prompt)
    n_t5 = len(t5_tokens["t5xxl"][0])
    assert n_t5 == 101  # 100 words + end token
    assert clip_t5.encode_from_tokens(t5_tokens).shape == (1, 154 + n_t5, 4096)
    assert clip_t5.encode_from_tokens(clip_t5.tokenize("cat")).shape == (1, 77 + 77, 4096)  # T5 min length 77


def test_clip_deterministic_and_word_specific(fixture_clip, comfy):
    from fixtures.fixture_clip import make_fixture_clip, token_vector
    other = make_fixture_clip()
    a, pa = fixture_clip.encode_from_tokens(fixture_clip.tokenize("a cat on a mat"), return_pooled=True)
    b, pb = other.encode_from_tokens(other.tokenize("a cat on a mat"), return_pooled=True)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    c, pc = fixture_clip.encode_from_tokens(fixture_clip.tokenize("a dog on a mat"), return_pooled=True)
    assert not torch.equal(a[0, 2], c[0, 2]) and torch.equal(a[0, 3], c[0, 3])  # only "cat"/"dog" differ
    assert not torch.equal(pa, pc)
    # The vector at a word's position is that token's fixed vector, in any prompt.
    cat_id = fixture_clip.tokenize("cat")["l"][0][1][0]
    d = fixture_clip.encode_from_tokens(fixture_clip.tokenize("the big cat"))
    assert torch.equal(d[0, 3, :768], token_vector("l", cat_id, 768))
    assert torch.equal(d[0, 3], a[0, 2])


def test_clip_through_comfy_nodes(fixture_clip, comfy):
    from toyworld.comfy_env import get_nodes
    nodes = get_nodes(extras=False)
    (cond,) = nodes.CLIPTextEncode().encode(fixture_clip, "a red cube")
    assert len(cond) == 1 and cond[0][0].shape == (1, 77, 4096)
    assert cond[0][1]["pooled_output"].shape == (1, 2048)
    (clip2,) = nodes.CLIPSetLastLayer().set_last_layer(fixture_clip, -2)
    assert torch.equal(clip2.encode_from_tokens(clip2.tokenize("a red cube")), cond[0][0])


def test_test_node_pack_loads_through_comfy_loader(comfy):
    from fixtures.comfy_base import TEST_NODES_DIR
    from toyworld.comfy_env import get_nodes, load_custom_node_pack
    assert load_custom_node_pack(TEST_NODES_DIR)
    nodes = get_nodes(extras=False)
    node_cls = nodes.NODE_CLASS_MAPPINGS["AnchorDiffTestCLIP"]
    (clip,) = getattr(node_cls(), node_cls.FUNCTION)(t5=True)
    assert clip.encode_from_tokens(clip.tokenize("cat")).shape == (1, 154, 4096)


# --- fixture VAE ------------------------------------------------------------------

def test_vae_loads_via_comfy_and_round_trips_1024(comfy_models_dir):
    from toyworld.comfy_env import get_nodes
    nodes = get_nodes(extras=False)
    assert "taesd3" in nodes.VAELoader.vae_list(nodes.VAELoader)
    (vae,) = nodes.VAELoader().load_vae("taesd3")
    assert vae.latent_channels == 16
    assert abs(vae.first_stage_model.vae_scale.item() - 1.5305) < 1e-6  # SD3 scale, set by the loader
    image = torch.rand(1, 1024, 1024, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        latent = vae.encode(image)
        decoded = vae.decode(latent)
    assert latent.shape == (1, 16, 128, 128) and torch.isfinite(latent).all() and latent.std() > 0.01
    assert decoded.shape == (1, 1024, 1024, 3) and torch.isfinite(decoded).all()
    assert decoded.min() >= 0 and decoded.max() <= 1 and decoded.std() > 0.01


# --- everything together -----------------------------------------------------------

def test_fixtures_sample_through_comfy_nodes(comfy_models_dir, fixture_clip):
    """UNETLoader + fixture CLIP + KSampler + taesd3 VAEDecode: the route server tests use."""
    from toyworld.comfy_env import get_nodes
    nodes = get_nodes(extras=False)
    (model,) = nodes.UNETLoader().load_unet("tiny_sd3.safetensors", "default")
    (pos,) = nodes.CLIPTextEncode().encode(fixture_clip, "a cat")
    (neg,) = nodes.CLIPTextEncode().encode(fixture_clip, "")
    (vae,) = nodes.VAELoader().load_vae("taesd3")
    latent = {"samples": torch.zeros(1, 16, 32, 32)}
    with torch.inference_mode():
        (out,) = nodes.KSampler().sample(model, 1, 2, 4.0, "euler", "simple", pos, neg, latent, denoise=1.0)
        (image,) = nodes.VAEDecode().decode(vae, out)
    assert out["samples"].shape == (1, 16, 32, 32) and torch.isfinite(out["samples"]).all()
    assert image.shape == (1, 256, 256, 3) and torch.isfinite(image).all()
