"""Chroma through its backbone adapter (nodes/models/chroma.py), inside a real ComfyUI, with a tiny
random-weight Chroma loaded by ComfyUI's own loader (tests/fixtures/tiny_chroma.py; its detection is
narrowed in the test harness, see there).

Checks the recording against an independent implementation (diffusers' ChromaTransformer2DModel
holding the same weights), that a planted bug in the concept stream's modulation is caught, that the
recorded image is bit-identical to a plain run (Chroma samples with real CFG), and the errors users see.
"""
import sys
import types
from pathlib import Path

import pytest
import torch
from fixtures.flux_family import assert_maps_match, noisy_latent, packed, read_maps, record, relative_error, run, sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(comfy, comfy_models_dir):
    from fixtures.comfy_test_nodes.flux_clip import make_chroma_fixture_clip, make_flux_fixture_clip
    from fixtures.tiny_chroma import VARIANTS, write_to_models_dir
    from fixtures.tiny_flux import FLUX_DEV
    from fixtures.tiny_flux import write_to_models_dir as write_flux
    from toyworld import comfy_env

    nodes = comfy_env.get_nodes(extras=True)
    if "AnchorDiffMask" not in nodes.NODE_CLASS_MAPPINGS:  # once per process, as the other test modules do
        assert comfy_env.load_custom_node_pack(REPO), "our pack failed to load in ComfyUI"
    for name, cfg in VARIANTS.items():
        write_to_models_dir(comfy_models_dir, name, cfg)
    write_flux(comfy_models_dir, "tiny_flux_dev", FLUX_DEV)
    pack = comfy_env.pack_module(REPO)
    clip = make_chroma_fixture_clip()
    ns = types.SimpleNamespace(nodes=nodes, pack=pack, clip=clip, flux_clip=make_flux_fixture_clip(), models=comfy_models_dir,
                               N=nodes.NODE_CLASS_MAPPINGS)
    ns.pos = nodes.CLIPTextEncode().encode(clip, "a cat next to a red car")[0]
    ns.neg = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    return ns


def load_model(env, name="tiny_chroma"):
    from fixtures.tiny_chroma import VARIANTS, load_with_comfy
    return load_with_comfy(env.models / "diffusion_models" / f"{name}.safetensors", expect=VARIANTS[name])


def concepts(env, text="cat, red car"):
    return run(env, "AnchorDiffConcepts", env.clip, text)[0]


def diffusers_reference(env, model, cs, maps, latent, seed, layers, seg):
    """The same noisy latent, sigma and conditioning through diffusers' own Chroma."""
    from fixtures.tiny_chroma import CHROMA, build_diffusers

    sys.path.insert(0, str(REPO))
    from anchordiff_core.diffusers_chroma import DiffusersChromaRecorder

    x = noisy_latent(model, latent, seed, maps.sigma)
    hidden, img_ids = packed(x)
    cond = env.pos[0][0]
    recorder = DiffusersChromaRecorder(build_diffusers(CHROMA), cs, graph_layers=layers, seg4diff_layer=seg)
    return recorder.record(hidden, img_ids, torch.zeros(cond.shape[1], 3), torch.tensor([maps.sigma]), cond,
                           grid=(x.shape[-2] // 2, x.shape[-1] // 2), image_size=(x.shape[-2] * 8, x.shape[-1] * 8))


# ------------------------------------------------------------------ the model, the adapter, the fixture
def test_comfyui_loads_the_tiny_chroma_and_the_adapter_names_it(env):
    adapters = sys.modules[env.pack.__name__ + ".nodes.models"]
    adapter = adapters.adapter_for(load_model(env))
    assert type(adapter).__name__ == "ChromaAdapter"
    assert adapter.variant() == "Chroma-architecture model with 2 double + 2 single blocks"
    assert adapter.num_blocks() == 4 and adapter.heads() == 2 and adapter.width() == 256 and adapter.context_width() == 4096
    assert adapter.block_keys() == [("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)]
    assert adapter.default_graph_layers() == (1, 2) and adapter.default_seg4diff_layer() == 1  # 9/23, 18/23 of 0..3


def test_the_two_implementations_hold_the_same_model(env):
    """The fixture itself: ComfyUI's and diffusers' Chroma give the same prediction once diffusers' final
    modulation slot is the one ComfyUI reads (ComfyUI always computes 344 slots, the real Chroma's count,
    and takes the last two for the final layer; diffusers computes as many as the blocks need). The
    blocks' slots, all that the maps depend on, are the same in both."""
    from diffusers.models.embeddings import get_timestep_embedding
    from fixtures.tiny_chroma import build_diffusers

    comfy_chroma, ours = load_model(env).model.diffusion_model, build_diffusers()
    ours.time_text_embed.mod_proj = get_timestep_embedding(torch.arange(344) * 1000, 32, flip_sin_to_cos=True,
                                                           downscale_freq_shift=0)
    x, context = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(3)), env.pos[0][0]
    with torch.no_grad():
        want = packed(comfy_chroma(x, torch.tensor([0.6]), context, torch.tensor([0.0])))[0]
        hidden, ids = packed(x)
        got = ours(hidden_states=hidden, encoder_hidden_states=context, timestep=torch.tensor([0.6]), img_ids=ids,
                   txt_ids=torch.zeros(context.shape[1], 3), return_dict=False)[0]
    assert relative_error(got, want) < 1e-5  # measured 1.6e-6


def test_chroma_concepts_come_from_t5_at_their_token_positions(env):
    cs = concepts(env, "cat, red car")
    assert cs.encoder == "Chroma" and cs.embeddings.shape[1] == 4096
    assert cs.token_concept.tolist().count(0) >= 1 and cs.token_concept.tolist().count(1) >= 2  # "red car": 2+ T5 tokens
    t5 = env.clip.encode_from_tokens(env.clip.tokenize("cat"))  # [1, L, 4096]
    assert torch.allclose(cs.embeddings[0], t5[0, 0].float())
    from fixtures.tiny_flux import FLUX_DEV
    from fixtures.tiny_flux import load_with_comfy as load_flux
    flux = load_flux(env.models / "diffusion_models" / "tiny_flux_dev.safetensors", expect=FLUX_DEV)
    with pytest.raises(ValueError, match="text encoders of Chroma, but the model is Flux.1"):
        record(env, flux, cs)
    with pytest.raises(ValueError, match="text encoders of Flux.1 .*, but the model is Chroma"):
        record(env, load_model(env), run(env, "AnchorDiffConcepts", env.flux_clip, "cat")[0])


# ------------------------------------------------------------------ independent cross-check
def test_recorded_maps_equal_diffusers_chroma_holding_the_same_weights(env):
    model = load_model(env)
    cs = concepts(env, "cat, red car")
    latent = {"samples": torch.randn(1, 16, 16, 24, generator=torch.Generator().manual_seed(1))}
    # graph layers: one double-stream and one single-stream block; Seg4Diff on a double-stream one
    maps = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 7, 0.5, "1, 3", 1)[0]
    assert maps.a_ci.shape == (1, 4, 2, 8 * 12) and maps.a_ii.shape == (1, 2, 96, 96) and maps.grid == (8, 12)
    assert maps.meta["model"].startswith("Chroma-architecture")
    expected = diffusers_reference(env, model, cs, maps, latent["samples"], 7, (1, 3), 1)
    assert_maps_match(maps, expected)
    # not trivially equal: concepts, blocks and layers differ
    assert (maps.a_ci[0, :, 0] - maps.a_ci[0, :, 1]).abs().max() > 1e-3
    assert (maps.a_ci[0, 0] - maps.a_ci[0, 3]).abs().max() > 1e-3
    assert (maps.a_ii[0, 0] - maps.a_ii[0, 1]).abs().max() > 1e-3


def test_a_wrong_concept_modulation_is_caught_by_the_cross_check(env, monkeypatch):
    """A planted bug, the concept stream modulated with the image stream's slots instead of the text
    stream's (what Chroma's adapter adds to Flux's): the diffusers capture disagrees."""
    model = load_model(env)
    cs = concepts(env)
    latent = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))}
    chroma = sys.modules[env.pack.__name__ + ".nodes.models.chroma"]
    good = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 3, 0.5, "0, 3", 0)[0]
    monkeypatch.setattr(chroma.ChromaAdapter, "_text_modulation",
                        lambda self, block, vec, rows: tuple(chroma._rows(mod, rows) for mod in vec[0]))
    bad = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 3, 0.5, "0, 3", 0)[0]
    expected = diffusers_reference(env, model, cs, good, latent["samples"], 3, (0, 3), 0)
    assert_maps_match(good, expected)
    assert relative_error(bad.a_ci, expected.a_ci) > 1e-3


# ------------------------------------------------------------------ the image is unchanged
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_recorded_image_is_bit_identical_to_a_plain_run(env, cfg):
    """Chroma as users sample it (real CFG with a negative prompt) and with cfg 1 (one forward per step)."""
    model = load_model(env)
    patched, recorder = record(env, model, concepts(env), record_step=2)
    seen = {"patched": [], "plain": []}

    def keep(where):
        return lambda step, x0, x, total: seen[where].append(x0.clone())

    out_p = sample(env, patched, seed=3, callback=keep("patched"), cfg=cfg, negative=env.neg)
    out_u = sample(env, model, seed=3, callback=keep("plain"), cfg=cfg, negative=env.neg)
    assert len(seen["patched"]) == 4
    for step, (a, b) in enumerate(zip(seen["patched"], seen["plain"])):
        assert torch.equal(a, b), f"denoised output differs at step {step}"
    assert torch.equal(out_p["samples"], out_u["samples"])
    maps = read_maps(env, recorder, out_p)
    assert maps.step == 2 and maps.batch_size == 1  # the recording step ran (positive rows only), and nothing changed
    assert not model.wrappers, "the input MODEL must not carry our wrappers"


def test_chroma_radiance_is_refused_with_the_reason(env):
    """Chroma Radiance (pixel space) is a Chroma subclass the adapter does not take."""
    adapters = sys.modules[env.pack.__name__ + ".nodes.models"]
    from comfy.ldm.chroma.model import Chroma
    radiance = type("ChromaRadiance", (Chroma,), {})
    model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=object.__new__(radiance)))
    with pytest.raises(ValueError, match="ChromaRadiance: Chroma Radiance works in pixel space.*Supported families: .*Chroma"):
        adapters.adapter_for(model)
