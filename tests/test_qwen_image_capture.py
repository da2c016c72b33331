"""Qwen-Image (and Qwen-Image Edit's reference tokens) through the backbone adapter, inside a real
ComfyUI, with a tiny random-weight Qwen-Image loaded by ComfyUI's own loader
(tests/fixtures/tiny_qwen_image.py) and the fixture CLIP (real Qwen tokenizer and template handling,
fake Qwen2.5-VL).

Checks the recording against an independent implementation (diffusers' QwenImageTransformer2DModel
holding the same weights), that the recorded image is bit-identical to a plain run, one forward per
step and a CFG batch (record_at, stale-map protection), Edit's reference tokens left out, a planted
bug caught, and the errors users see.
"""
import sys
import types
from pathlib import Path

import pytest
import torch

from fixtures.flux_family import assert_maps_match, core_node, noisy_latent, relative_error, sample
from fixtures.node_chain import read_maps, record, run

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a cat next to a red car"


@pytest.fixture(scope="module")
def env(comfy, comfy_models_dir):
    from fixtures.comfy_test_nodes.qwen_image_clip import make_qwen_image_fixture_clip
    from fixtures.tiny_qwen_image import VARIANTS, write_to_models_dir
    from toyworld import comfy_env

    nodes = comfy_env.get_nodes(extras=True)
    if "AnchorDiffMask" not in nodes.NODE_CLASS_MAPPINGS:  # once per process, as the other test modules do
        assert comfy_env.load_custom_node_pack(REPO), "our pack failed to load in ComfyUI"
    for name, cfg in VARIANTS.items():
        write_to_models_dir(comfy_models_dir, name, cfg)
    pack = sys.modules[str(REPO).replace(".", "_x_")]
    clip = make_qwen_image_fixture_clip()
    ns = types.SimpleNamespace(nodes=nodes, pack=pack, clip=clip, models=comfy_models_dir, N=nodes.NODE_CLASS_MAPPINGS)
    ns.pos = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    return ns


def load_model(env, name="tiny_qwen_image", **options):
    from fixtures.tiny_qwen_image import VARIANTS, load_with_comfy
    return load_with_comfy(env.models / "diffusion_models" / f"{name}.safetensors", expect=VARIANTS[name], **options)


def concepts(env, text="cat, red car"):
    return run(env, "AnchorDiffConcepts", env.clip, text)[0]


def latent5d(h, w, seed):
    """A Qwen-Image latent as VAE Encode gives it (Wan 2.1's VAE: [B, 16, frames, h, w])."""
    return torch.randn(1, 16, 1, h, w, generator=torch.Generator().manual_seed(seed))


def diffusers_reference(env, model, cs, maps, latent, seed, layers, seg, reference=None, positive=None, cfg=None):
    """The same noisy latent, sigma and conditioning through diffusers' own Qwen-Image (`cfg`: the tiny
    model's config, default QWEN_IMAGE)."""
    from einops import rearrange
    from fixtures.tiny_qwen_image import QWEN_IMAGE, build_diffusers

    sys.path.insert(0, str(REPO))
    from anchordiff_core.diffusers_qwen_image import DiffusersQwenImageRecorder

    sigma = maps.sigma
    x = noisy_latent(model, latent, seed, sigma)

    def packed(t):
        return rearrange(t[:, :, 0], "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2), (1, t.shape[-2] // 2, t.shape[-1] // 2)

    hidden, shape = packed(x)
    shapes = [shape]
    if reference is not None:  # Edit: the reference latent's tokens follow (diffusers: the second image shape)
        ref, ref_shape = packed(model.model.process_latent_in(reference))
        hidden, shapes = torch.cat([hidden, ref], 1), shapes + [ref_shape]
    cond = (positive or env.pos)[0][0]
    recorder = DiffusersQwenImageRecorder(build_diffusers(cfg or QWEN_IMAGE), cs, graph_layers=layers, seg4diff_layer=seg)
    return recorder.record(hidden, torch.tensor([sigma]), cond, [shapes], grid=shape[1:],
                           image_size=(x.shape[-2] * 8, x.shape[-1] * 8))


# ------------------------------------------------------------------ the model and the adapter
def test_comfyui_loads_the_tiny_qwen_image_and_the_adapter_names_it(env):
    adapters = sys.modules[env.pack.__name__ + ".nodes.models"]
    adapter = adapters.adapter_for(load_model(env))
    assert type(adapter).__name__ == "QwenImageAdapter"
    assert adapter.variant() == "Qwen-Image-architecture model with 3 blocks"
    assert adapter.num_blocks() == 3 and adapter.heads() == 2 and adapter.width() == 256 and adapter.context_width() == 3584
    assert adapter.block_keys() == [("double_block", 0), ("double_block", 1), ("double_block", 2)]
    assert adapter.default_graph_layers() == (1, 2) and adapter.default_seg4diff_layer() == 1  # 9/23, 18/23 of 0..2


def test_qwen_concepts_come_from_the_encoder_at_their_token_positions(env):
    cs = concepts(env, "cat, red car")
    assert cs.encoder.startswith("Qwen-Image") and cs.embeddings.shape[1] == 3584
    # "cat , red car" after the template's head: cat, " ,", " red", " car" (Qwen's BPE: " red" is not "red")
    assert cs.token_concept.tolist() == [0, 1, 1] and cs.positions.tolist() == [0, 2, 3]
    cond = env.clip.encode_from_tokens(env.clip.tokenize("cat , red car"))
    assert torch.equal(cs.embeddings, cond[0, [0, 2, 3]].float())
    single = concepts(env, "red car")
    assert single.positions.tolist() == [0, 1]  # first in the string: "red", not " red"
    with pytest.raises(ValueError, match="text encoders of Qwen-Image .* but the model is SD3"):
        from fixtures.tiny_sd3 import VARIANTS, load_with_comfy
        sd3 = load_with_comfy(env.models / "diffusion_models" / "tiny_sd3.safetensors", expect=VARIANTS["tiny_sd3"])
        record(env, sd3, cs)


# ------------------------------------------------------------------ independent cross-check
def test_recorded_maps_equal_diffusers_qwen_image_holding_the_same_weights(env):
    model = load_model(env)
    cs = concepts(env, "cat, red car")
    latent = {"samples": latent5d(16, 24, 1)}
    maps = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 7, 0.5, "0, 2", 1)[0]
    assert maps.a_ci.shape == (1, 3, 2, 8 * 12) and maps.a_ii.shape == (1, 2, 96, 96) and maps.grid == (8, 12)
    assert maps.meta["model"].startswith("Qwen-Image-architecture")
    expected = diffusers_reference(env, model, cs, maps, latent["samples"], 7, (0, 2), 1)
    assert_maps_match(maps, expected)
    # not trivially equal: concepts, blocks and layers differ
    assert (maps.a_ci[0, :, 0] - maps.a_ci[0, :, 1]).abs().max() > 1e-3
    assert (maps.a_ci[0, 0] - maps.a_ci[0, 2]).abs().max() > 1e-3
    assert (maps.a_ii[0, 0] - maps.a_ii[0, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("bug", ["concept RoPE scaled", "concepts at the first text position"])
def test_a_wrong_concept_stream_is_caught_by_the_cross_check(env, monkeypatch, bug):
    """Planted bugs: the concept tokens' rotation replaced by a scaling; every concept token rotated at
    the prompt's first position (not at its own). The diffusers capture disagrees with both."""
    model = load_model(env)
    cs = concepts(env)
    latent = {"samples": latent5d(8, 8, 2)}
    qwen = sys.modules[env.pack.__name__ + ".nodes.models.qwen_image"]
    good = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 3, 0.5, "0, 2", 0)[0]
    if bug == "concept RoPE scaled":
        monkeypatch.setattr(qwen, "apply_rope1", lambda x, pe: x * 1.5)
    else:
        original = qwen.QwenImageAdapter.concept_rope
        monkeypatch.setattr(qwen.QwenImageAdapter, "concept_rope",
                            lambda self, positions, grid, dtype, device: original(self, positions * 0, grid, dtype, device))
    bad = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 3, 0.5, "0, 2", 0)[0]
    expected = diffusers_reference(env, model, cs, good, latent["samples"], 3, (0, 2), 0)
    assert_maps_match(good, expected)
    assert relative_error(bad.a_ci, expected.a_ci) > 1e-3


# ------------------------------------------------------------------ the image is unchanged
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_recorded_image_is_bit_identical_to_a_plain_run(env, cfg):
    model = load_model(env)
    patched, recorder = record(env, model, concepts(env), record_step=2)
    seen = {"patched": [], "plain": []}

    def keep(where):
        return lambda step, x0, x, total: seen[where].append(x0.clone())

    negative = env.nodes.CLIPTextEncode().encode(env.clip, "blurry")[0]
    out_p = sample(env, patched, seed=3, callback=keep("patched"), cfg=cfg, negative=negative)
    out_u = sample(env, model, seed=3, callback=keep("plain"), cfg=cfg, negative=negative)
    assert len(seen["patched"]) == 4 and out_p["samples"].shape == (1, 16, 1, 16, 24)
    for step, (a, b) in enumerate(zip(seen["patched"], seen["plain"])):
        assert torch.equal(a, b), f"denoised output differs at step {step}"
    assert torch.equal(out_p["samples"], out_u["samples"])
    maps = read_maps(env, recorder, out_p)
    assert maps.step == 2  # the recording step ran, and still nothing changed
    assert not model.wrappers, "the input MODEL must not carry our wrappers"


# ------------------------------------------------------------------ one forward per step, CFG batch
def test_single_forward_records_at_record_at_and_never_serves_stale_maps(env, monkeypatch):
    model = load_model(env)
    calls = []
    adapter = sys.modules[env.pack.__name__ + ".nodes.models.qwen_image"].QwenImageAdapter
    original = adapter.record_block

    def counting(self, call, index, args, captured):
        calls.append((index, call.rows.tolist()))
        return original(self, call, index, args, captured)

    monkeypatch.setattr(adapter, "record_block", counting)
    patched, recorder = record(env, model, concepts(env), record_at=0.5)
    first = sample(env, patched, seed=11, steps=6)
    maps = read_maps(env, recorder, first)
    sigmas = model.get_model_object("model_sampling")
    import comfy.samplers
    schedule = comfy.samplers.calculate_sigmas(sigmas, "simple", 6)
    target = float(sigmas.percent_to_sigma(0.5))
    nearest = min(range(6), key=lambda i: (abs(float(schedule[i]) - target), i))
    assert maps.step == nearest and abs(maps.sigma - float(schedule[nearest])) < 1e-6
    assert calls == [(i, [0]) for i in range(3)]  # one call, one (positive) row, every block once
    second = sample(env, patched, seed=12, steps=6)
    maps2 = read_maps(env, recorder, second)
    assert maps2.meta["run"] != maps.meta["run"] and not torch.equal(maps2.a_ci, maps.a_ci)
    assert read_maps(env, recorder, first).meta["id"] == maps.meta["id"]  # each latent keeps its own maps
    with pytest.raises(ValueError, match="not produced by a sampler using this recorder's MODEL"):
        read_maps(env, recorder, sample(env, model, seed=13, steps=6))  # a plain run's latent
    late, late_recorder = record(env, model, concepts(env), record_at=0.99)
    with pytest.raises(ValueError, match="No maps were recorded in that sampling run"):
        read_maps(env, late_recorder, sample(env, late, seed=11, steps=2))


def test_cfg_batch_records_only_the_positive_rows(env, monkeypatch):
    """cfg 3 with a negative prompt of the same token count: cond and uncond share one call (two rows);
    the positive row's maps equal those of the cfg-1 run at step 0 (same noisy latent)."""
    model = load_model(env)
    cs = concepts(env)
    negative = env.nodes.CLIPTextEncode().encode(env.clip, "a dog next to a blue bus")[0]
    assert negative[0][0].shape == env.pos[0][0].shape  # same length: ComfyUI batches them
    batches = []
    adapter = sys.modules[env.pack.__name__ + ".nodes.models.qwen_image"].QwenImageAdapter
    original = adapter.record_block

    def seeing(self, call, index, args, captured):
        batches.append(args["img"].shape[0])
        return original(self, call, index, args, captured)

    monkeypatch.setattr(adapter, "record_block", seeing)
    results = {}
    for name, cfg in (("cfg1", 1.0), ("cfg3", 3.0)):
        patched, recorder = record(env, model, cs, record_step=0)
        results[name] = read_maps(env, recorder, sample(env, patched, seed=5, steps=3, cfg=cfg, negative=negative))
    assert batches == [1, 1, 1, 2, 2, 2]
    for field in ("a_ci", "a_ii", "o_ii", "ca_scores"):
        error = relative_error(getattr(results["cfg3"], field), getattr(results["cfg1"], field))
        assert error < 1e-5, (field, error)
    assert results["cfg3"].batch_size == 1


def test_edit_reference_tokens_are_left_out_and_the_image_is_unchanged(env):
    """Qwen-Image Edit's reference latent (ReferenceLatent, as TextEncodeQwenImageEdit sets it)."""
    model = load_model(env)
    cs = concepts(env)
    reference = latent5d(8, 12, 5)
    positive = core_node(env.nodes, "ReferenceLatent", env.pos, {"samples": reference})
    patched, recorder = record(env, model, cs, record_at=0.5, graph_layers="0, 2", seg4diff_layer=1)
    out_p = sample(env, patched, seed=4, size=(16, 16), positive=positive)
    out_u = sample(env, model, seed=4, size=(16, 16), positive=positive)
    assert torch.equal(out_p["samples"], out_u["samples"])
    maps = read_maps(env, recorder, out_p)
    assert maps.grid == (8, 8) and maps.a_ii.shape == (1, 2, 64, 64) and maps.a_ci.shape[-1] == 64  # 24 reference tokens left out
    latent = {"samples": latent5d(16, 16, 6)}
    looked = run(env, "AnchorDiffLookAtImage", model, cs, positive, latent, 2, 0.5, "0, 2", 1)[0]
    expected = diffusers_reference(env, model, cs, looked, latent["samples"], 2, (0, 2), 1, reference=reference, positive=positive)
    assert_maps_match(looked, expected)
    plain = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 2, 0.5, "0, 2", 1)[0]
    assert relative_error(plain.a_ii, looked.a_ii) > 1e-3  # the references were seen by the image tokens


def test_edit_2511_reference_tokens_at_timestep_zero(env, tmp_path, monkeypatch):
    """Qwen-Image Edit 2511 (ComfyUI >= 0.33: the file's __index_timestep_zero__ marker): the reference
    tokens are modulated at timestep 0, so every block gets two modulation rows per image; the concept
    stream takes the prompt stream's (the first), the image stays bit-identical, the maps equal
    diffusers' zero_cond_t model holding the same weights (which a concept stream on the timestep-zero
    row would not: checked by planting it)."""
    import dataclasses
    import inspect

    import comfy.ldm.qwen_image.model as qwen_model
    from fixtures.tiny_qwen_image import QWEN_IMAGE, load_with_comfy, write_to_models_dir

    if "default_ref_method" not in inspect.signature(qwen_model.QwenImageTransformer2DModel.__init__).parameters:
        pytest.skip("this ComfyUI has no Qwen-Image Edit 2511 (index_timestep_zero reference method; ComfyUI >= 0.33)")
    cfg = dataclasses.replace(QWEN_IMAGE, timestep_zero=True)
    model = load_with_comfy(write_to_models_dir(tmp_path, "tiny_qwen_image_edit_2511", cfg), expect=cfg)
    cs = concepts(env)
    reference = latent5d(8, 12, 5)
    positive = core_node(env.nodes, "ReferenceLatent", env.pos, {"samples": reference})
    adapter = sys.modules[env.pack.__name__ + ".nodes.models.qwen_image"].QwenImageAdapter
    seen, original = [], adapter.record_block

    def seeing(self, call, index, args, captured):
        seen.append((args["vec"].shape[0], args["img"].shape[0]))
        return original(self, call, index, args, captured)

    monkeypatch.setattr(adapter, "record_block", seeing)
    patched, recorder = record(env, model, cs, record_at=0.5, graph_layers="0, 2", seg4diff_layer=1)
    out_p = sample(env, patched, seed=4, size=(16, 16), positive=positive)
    assert seen and all(v == 2 * b for v, b in seen), seen  # timestep zero: two modulation rows per image
    assert torch.equal(out_p["samples"], sample(env, model, seed=4, size=(16, 16), positive=positive)["samples"])
    assert read_maps(env, recorder, out_p).grid == (8, 8)
    latent = {"samples": latent5d(16, 16, 6)}
    looked = run(env, "AnchorDiffLookAtImage", model, cs, positive, latent, 2, 0.5, "0, 2", 1)[0]
    expected = diffusers_reference(env, model, cs, looked, latent["samples"], 2, (0, 2), 1, reference=reference,
                                   positive=positive, cfg=cfg)
    assert_maps_match(looked, expected)

    def wrong_half(self, call, index, args, captured):  # planted: the concept stream on the timestep-zero row
        vec = args["vec"]
        return original(self, call, index, {**args, "vec": torch.cat([vec[vec.shape[0] // 2:], vec[vec.shape[0] // 2:]])}, captured)

    monkeypatch.setattr(adapter, "record_block", wrong_half)
    planted = run(env, "AnchorDiffLookAtImage", model, cs, positive, latent, 2, 0.5, "0, 2", 1)[0]
    assert relative_error(planted.a_ci, expected.a_ci) > 1e-3


# ------------------------------------------------------------------ errors
def test_layers_out_of_range_and_concepts_of_another_backbone_are_refused(env):
    model = load_model(env)
    with pytest.raises(ValueError, match="out of range: this Qwen-Image-architecture .* has 3 joint blocks"):
        record(env, model, concepts(env), graph_layers="0, 3")
    from toyworld.comfy_clip import make_fixture_clip
    sd3_concepts = run(env, "AnchorDiffConcepts", make_fixture_clip(), "cat")[0]
    with pytest.raises(ValueError, match="SD3"):
        record(env, model, sd3_concepts)
