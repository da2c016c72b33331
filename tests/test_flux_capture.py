"""Flux.1 (dev, schnell) through the backbone adapter, inside a real ComfyUI, with tiny random-weight
Flux models loaded by ComfyUI's own loader (tests/fixtures/tiny_flux.py).

Checks the recording against an independent implementation (diffusers' FluxTransformer2DModel
holding the same weights), that the recorded image is bit-identical to a plain run, the
guidance-distilled single forward per step (record_at, stale-map protection), Kontext reference
tokens left out, and the errors users see.
"""
import sys
import types
from pathlib import Path

import pytest
import torch
from fixtures.flux_family import assert_maps_match, core_node, noisy_latent, packed, relative_error, sample

from fixtures import node_chain
from fixtures.node_chain import read_maps, record, run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(comfy, comfy_models_dir):
    from fixtures.comfy_base import TEST_NODES_DIR
    from fixtures.comfy_test_nodes.flux_clip import make_flux_fixture_clip
    from fixtures.tiny_flux import VARIANTS, write_to_models_dir
    from toyworld import comfy_env
    from toyworld.comfy_clip import make_fixture_clip

    nodes = comfy_env.get_nodes(extras=True)
    if "AnchorDiffMask" not in nodes.NODE_CLASS_MAPPINGS:  # once per process, as the other test modules do
        assert comfy_env.load_custom_node_pack(REPO), "our pack failed to load in ComfyUI"
    if "AnchorDiffTestFluxCLIP" not in nodes.NODE_CLASS_MAPPINGS:
        assert comfy_env.load_custom_node_pack(TEST_NODES_DIR)
    for name, cfg in VARIANTS.items():
        write_to_models_dir(comfy_models_dir, name, cfg)
    pack = comfy_env.pack_module(REPO)
    clip = make_flux_fixture_clip()
    ns = types.SimpleNamespace(nodes=nodes, pack=pack, clip=clip, sd3_clip=make_fixture_clip(), models=comfy_models_dir,
                               N=nodes.NODE_CLASS_MAPPINGS)
    encoded = nodes.CLIPTextEncode().encode(clip, "a cat next to a red car")[0]
    ns.pos = env_guidance(nodes, encoded, 3.5)
    return ns


def env_guidance(nodes, conditioning, guidance):
    """FluxGuidance, as a Flux dev workflow sets it."""
    return core_node(nodes, "FluxGuidance", conditioning, guidance)


def load_model(env, name="tiny_flux_dev"):
    from fixtures.tiny_flux import VARIANTS, load_with_comfy
    return load_with_comfy(env.models / "diffusion_models" / f"{name}.safetensors", expect=VARIANTS[name])


def concepts(env, text="cat, red car"):
    return run(env, "AnchorDiffConcepts", env.clip, text)[0]


def diffusers_reference(env, model, cs, maps, latent, seed, layers, seg, name="tiny_flux_dev", reference=None):
    """The same noisy latent, sigma, conditioning and guidance through diffusers' own Flux."""
    from fixtures.tiny_flux import VARIANTS, build_diffusers

    sys.path.insert(0, str(REPO))
    from anchordiff_core.diffusers_flux import DiffusersFluxRecorder

    sigma = maps.sigma
    x = noisy_latent(model, latent, seed, sigma)
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    hidden, img_ids = packed(x, 0)
    if reference is not None:  # Kontext: the reference latent's tokens follow, at RoPE index 1
        ref, ref_ids = packed(model.model.process_latent_in(reference), 1)
        hidden, img_ids = torch.cat([hidden, ref], 1), torch.cat([img_ids, ref_ids], 0)
    cond = env.pos[0][0]
    recorder = DiffusersFluxRecorder(build_diffusers(VARIANTS[name]), cs, graph_layers=layers, seg4diff_layer=seg)
    guidance = torch.tensor([3.5]) if VARIANTS[name].guidance else None
    return recorder.record(hidden, img_ids, torch.zeros(cond.shape[1], 3), torch.tensor([sigma]), cond,
                           env.pos[0][1]["pooled_output"], guidance, grid=(h, w), image_size=(x.shape[-2] * 8, x.shape[-1] * 8))


# ------------------------------------------------------------------ the model and the adapter
def test_comfyui_loads_the_tiny_flux_and_the_adapter_names_it(env):
    adapters = sys.modules[env.pack.__name__ + ".nodes.models"]
    for name, variant in (("tiny_flux_dev", "guidance-distilled, dev-style"), ("tiny_flux_schnell", "schnell-style")):
        adapter = adapters.adapter_for(load_model(env, name))
        assert type(adapter).__name__ == "FluxAdapter"
        assert adapter.variant() == f"Flux.1-architecture model ({variant}) with 2 double + 2 single blocks"
        assert adapter.num_blocks() == 4 and adapter.heads() == 2 and adapter.width() == 256
        assert adapter.block_keys() == [("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)]


def test_flux_concepts_come_from_t5_at_their_token_positions(env):
    cs = concepts(env, "cat, red car")
    assert cs.encoder.startswith("Flux.1") and cs.embeddings.shape[1] == 4096
    assert cs.token_concept.tolist().count(0) >= 1 and cs.token_concept.tolist().count(1) >= 2  # "red car": 2+ T5 tokens
    # the rows are the T5 features the prompt encoder gives those tokens, not CLIP's
    tokens = env.clip.tokenize("cat")
    t5 = env.clip.encode_from_tokens(tokens)  # [1, L, 4096]
    assert torch.allclose(cs.embeddings[0], t5[0, 0].float())
    with pytest.raises(ValueError, match="text encoders of Flux.1 .* but the model is SD3"):
        from fixtures.tiny_sd3 import VARIANTS, load_with_comfy
        sd3 = load_with_comfy(env.models / "diffusion_models" / "tiny_sd3.safetensors", expect=VARIANTS["tiny_sd3"])
        record(env, sd3, cs)
    sd3_concepts = run(env, "AnchorDiffConcepts", env.sd3_clip, "cat")[0]
    with pytest.raises(ValueError, match="text encoders of SD3 .* but the model is Flux.1"):
        record(env, load_model(env), sd3_concepts)


# ------------------------------------------------------------------ independent cross-check
@pytest.mark.parametrize("name", ["tiny_flux_dev", "tiny_flux_schnell"])
def test_recorded_maps_equal_diffusers_flux_holding_the_same_weights(env, name):
    model = load_model(env, name)
    cs = concepts(env, "cat, red car")
    latent = {"samples": torch.randn(1, 16, 16, 24, generator=torch.Generator().manual_seed(1))}
    # graph layers: one double-stream and one single-stream block; Seg4Diff on a double-stream one
    maps = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 7, 0.5, "1, 3", 1)[0]
    assert maps.a_ci.shape == (1, 4, 2, 8 * 12) and maps.a_ii.shape == (1, 2, 96, 96) and maps.grid == (8, 12)
    assert maps.meta["model"].startswith("Flux.1-architecture")
    expected = diffusers_reference(env, model, cs, maps, latent["samples"], 7, (1, 3), 1, name)
    assert_maps_match(maps, expected)
    # not trivially equal: concepts, blocks and layers differ
    assert (maps.a_ci[0, :, 0] - maps.a_ci[0, :, 1]).abs().max() > 1e-3
    assert (maps.a_ci[0, 0] - maps.a_ci[0, 3]).abs().max() > 1e-3
    assert (maps.a_ii[0, 0] - maps.a_ii[0, 1]).abs().max() > 1e-3


def test_a_wrong_concept_stream_is_caught_by_the_cross_check(env, monkeypatch):
    """A planted bug, the concept tokens' RoPE rotation replaced by a scaling: the diffusers capture
    disagrees (so the comparison above can fail)."""
    model = load_model(env)
    cs = concepts(env)
    latent = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))}
    flux = sys.modules[env.pack.__name__ + ".nodes.models.flux"]
    good = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 3, 0.5, "0, 3", 0)[0]
    monkeypatch.setattr(flux, "apply_rope", lambda q, k, pe: (q * 1.5, k))  # concepts rotated wrongly
    bad = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 3, 0.5, "0, 3", 0)[0]
    expected = diffusers_reference(env, model, cs, good, latent["samples"], 3, (0, 3), 0)
    assert_maps_match(good, expected)
    assert relative_error(bad.a_ci, expected.a_ci) > 1e-3


# ------------------------------------------------------------------ the image is unchanged
@pytest.mark.parametrize("name", ["tiny_flux_dev", "tiny_flux_schnell"])
def test_recorded_image_is_bit_identical_to_a_plain_run(env, name):
    model = load_model(env, name)
    patched, recorder = record(env, model, concepts(env), record_step=2)
    seen = {"patched": [], "plain": []}

    def keep(where):
        return lambda step, x0, x, total: seen[where].append(x0.clone())

    out_p = sample(env, patched, seed=3, callback=keep("patched"))
    out_u = sample(env, model, seed=3, callback=keep("plain"))
    assert len(seen["patched"]) == 4
    for step, (a, b) in enumerate(zip(seen["patched"], seen["plain"])):
        assert torch.equal(a, b), f"denoised output differs at step {step}"
    assert torch.equal(out_p["samples"], out_u["samples"])
    maps = read_maps(env, recorder, out_p)
    assert maps.step == 2  # the recording step ran, and still nothing changed
    assert not model.wrappers, "the input MODEL must not carry our wrappers"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_flux_records_float32_maps_and_keeps_the_image(env, dtype):
    """Flux in bf16 / fp16 computing in that dtype (as on a GPU): the image is bit-identical to a plain
    run and the maps are float32 and finite. In fp16 they are also close to those of the same weights
    computed in float32. Not in bf16: there the tiny random Flux's own prediction already differs from
    its float32 one by 26% (measured; 0.07% in fp16), so its maps differ too, whatever records them."""
    import comfy.sd
    from fixtures.tiny_flux import narrow_detection

    path = env.models / "diffusion_models" / "tiny_flux_dev.safetensors"
    with narrow_detection():
        half = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})
        reference = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})  # same weights, fp32 math
    half.model.manual_cast_dtype = None  # compute in `dtype` (a CPU would otherwise upcast)
    cs = concepts(env)
    maps = {}
    for name, model in (("half", half), ("fp32", reference)):
        patched, recorder = record(env, model, cs, record_step=0)
        out_p = sample(env, patched, seed=8, steps=2)
        assert torch.equal(out_p["samples"], sample(env, model, seed=8, steps=2)["samples"])
        maps[name] = read_maps(env, recorder, out_p)
    for field in ("a_ci", "a_ii", "o_ii", "ca_scores", "seg4diff"):
        got, want = getattr(maps["half"], field), getattr(maps["fp32"], field)
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), field
        if dtype == torch.float16:
            assert (got - want).norm() / want.norm() < 0.01, field  # measured 0.08-0.2%


# ------------------------------------------------------------------ one forward per step
def test_guidance_distilled_single_forward_records_at_record_at_and_never_serves_stale_maps(env, monkeypatch):
    model = load_model(env)
    calls = []
    adapter = sys.modules[env.pack.__name__ + ".nodes.models.flux"].FluxAdapter
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
    assert calls == [(i, [0]) for i in range(4)]  # one call, one (positive) row, every block once
    second = sample(env, patched, seed=12, steps=6)
    maps2 = read_maps(env, recorder, second)
    assert maps2.meta["run"] != maps.meta["run"] and not torch.equal(maps2.a_ci, maps.a_ci)
    assert read_maps(env, recorder, first).meta["id"] == maps.meta["id"]  # each latent keeps its own maps
    with pytest.raises(ValueError, match="not produced by a sampler using this recorder's MODEL"):
        read_maps(env, recorder, sample(env, model, seed=13, steps=6))  # a plain run's latent
    # record_at beyond the run: refused with the reason, not filled from another run
    late, late_recorder = record(env, model, concepts(env), record_at=0.99)
    with pytest.raises(ValueError, match="No maps were recorded in that sampling run"):
        read_maps(env, late_recorder, sample(env, late, seed=11, steps=2))


def test_cfg_batch_records_only_the_positive_rows(env):
    """schnell / dev run with true CFG (cfg > 1, a negative prompt of the same length): cond and uncond
    share one call; the positive rows' maps equal those of the cfg-1 run at step 0 (same noisy latent)."""
    model = load_model(env, "tiny_flux_schnell")
    cs = concepts(env)
    negative = env.nodes.CLIPTextEncode().encode(env.clip, "blurry")[0]
    assert negative[0][0].shape[1] == env.pos[0][0].shape[1]  # T5 pads both to 256: one batched call
    results = {}
    for name, cfg in (("cfg1", 1.0), ("cfg3", 3.0)):
        patched, recorder = record(env, model, cs, record_step=0)
        results[name] = read_maps(env, recorder, sample(env, patched, seed=5, steps=3, cfg=cfg, negative=negative))
    for field in ("a_ci", "a_ii", "o_ii", "ca_scores"):
        error = relative_error(getattr(results["cfg3"], field), getattr(results["cfg1"], field))
        assert error < 1e-5, (field, error)
    assert results["cfg3"].batch_size == 1


def test_kontext_reference_tokens_are_left_out_and_the_image_is_unchanged(env):
    model = load_model(env)
    cs = concepts(env)
    reference = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(5))
    positive = core_node(env.nodes, "ReferenceLatent", env.pos, {"samples": reference})
    assert positive[0][1]["reference_latents"][0].shape == (1, 16, 8, 12)
    patched, recorder = record(env, model, cs, record_at=0.5, graph_layers="1, 3", seg4diff_layer=1)
    out_p = sample(env, patched, seed=4, size=(16, 16), positive=positive)
    out_u = sample(env, model, seed=4, size=(16, 16), positive=positive)
    assert torch.equal(out_p["samples"], out_u["samples"])
    maps = read_maps(env, recorder, out_p)
    assert maps.step == 2 and "record_at=0.5" in maps.meta["asked"]  # the middle of 4 steps, with the extra latent
    assert maps.grid == (8, 8) and maps.a_ii.shape == (1, 2, 64, 64) and maps.a_ci.shape[-1] == 64  # 48 reference tokens left out
    latent = {"samples": torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(6))}
    looked = run(env, "AnchorDiffLookAtImage", model, cs, positive, latent, 2, 0.5, "1, 3", 1)[0]
    expected = diffusers_reference(env, model, cs, looked, latent["samples"], 2, (1, 3), 1, reference=reference)
    assert_maps_match(looked, expected)
    plain = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 2, 0.5, "1, 3", 1)[0]
    assert relative_error(plain.a_ii, looked.a_ii) > 1e-3  # the references were seen by the image tokens


# ------------------------------------------------------------------ the chain, executed by ComfyUI
def flux_chain_prompt(seed):
    """A Flux.1 dev graph as users build it (UNETLoader, FluxGuidance, cfg 1), with AnchorDiff's nodes."""
    return node_chain.chain_prompt(seed, unet="tiny_flux_dev.safetensors", clip={"class_type": "AnchorDiffTestFluxCLIP", "inputs": {}},
                                   caption="a cat next to a red car", concepts="cat, red car", size=128, cfg=1.0, guidance=3.5)


def test_flux_chain_runs_in_comfyuis_executor_and_follows_the_seed(env):
    from fixtures.tiny_flux import narrow_detection

    runner = node_chain.executor()

    def masks(seed):
        with narrow_detection():  # ComfyUI 0.3.75 detects only the full-width Flux (see tiny_flux)
            return node_chain.run_chain(runner, flux_chain_prompt(seed), f"flux{seed}")

    first = masks(1)
    assert first.shape == (2, 128, 128) and set(first.unique().tolist()) <= {0.0, 1.0} and 0 < first.mean() < 1
    assert not torch.equal(first[0], first[1])  # one mask per concept
    second = masks(2)  # the sampler runs again; the cached recorder must serve the new run
    assert not torch.equal(first, second)
    assert torch.equal(masks(1), first)


# ------------------------------------------------------------------ errors
def test_unsupported_model_names_the_supported_families(env):
    import comfy.sd
    wan = comfy.sd.load_diffusion_model(str(env.models / "diffusion_models" / "tiny_wan21.safetensors"))
    with pytest.raises(ValueError) as info:
        record(env, wan, concepts(env))
    message = str(info.value)
    assert "WAN21 (WanModel)" in message
    assert message.startswith("AnchorDiff needs a model of a supported family, but the connected MODEL is WAN21 (WanModel).")
    adapters = sys.modules[env.pack.__name__ + ".nodes.models"].ADAPTERS
    assert f"Supported families: {'; '.join(adapter.family for adapter in adapters)}." in message
    assert "SD3 / SD3.5 (Medium, Large, Large Turbo); Flux.1 (dev, schnell, Kontext); Flux.2 (dev, Klein); Chroma; Qwen-Image (and Edit)" in message
    with pytest.raises(ValueError, match="out of range: this Flux.1-architecture .* has 4 joint blocks"):
        record(env, load_model(env), concepts(env), graph_layers="0, 4")
