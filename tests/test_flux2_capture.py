"""Flux.2 dev and Klein through their backbone adapter (nodes/models/flux2.py), inside a real ComfyUI, with
tiny random-weight Flux.2 models loaded by ComfyUI's own loader (tests/fixtures/tiny_flux2.py; a
dev-shaped one with guidance embedding and Mistral's text width, a Klein-shaped one without, Qwen3 4B's).

Checks the recording against an independent implementation (diffusers' Flux2Transformer2DModel holding
the same weights), that planted bugs in the concept stream's modulation and text positions are caught,
that the recorded image is bit-identical to a plain run, the single forward per step (record_at,
stale-map protection), reference-image tokens left out, and the errors users see.

Concepts: on ComfyUI 0.33 they are encoded through the real nodes with the family's real tokenizer and
text model (tests/fixtures/comfy_test_nodes/flux2_clip.py: Klein's Qwen BPE; dev's Mistral tekken BPE on a
tiny vocabulary; fake language models inside). ComfyUI 0.3.75 ships no Klein text encoder, and its Mistral
tokenizer loader does not run with the transformers of its venv: there the prompt features and the
ConceptSet are given as data, with text positions as the rule gives them for a 12-token concept string
(512 - 12 + place).
"""
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures.flux_family import assert_maps_match, core_node, noisy_latent, relative_error, sample

from fixtures.node_chain import read_maps, record, run

REPO = Path(__file__).resolve().parents[1]
TEXT_LEN = 512  # model_base.Flux2 left-pads the prompt to 512 tokens (nodes/models/flux2.py FLUX2_TEXT_LEN)


@pytest.fixture(scope="module")
def env(comfy, comfy_models_dir):
    from fixtures.comfy_test_nodes.flux2_clip import (
        klein_available, make_flux2_dev_fixture_clip, make_klein_fixture_clip, mistral_unavailable,
    )
    from fixtures.comfy_test_nodes.flux_clip import make_flux_fixture_clip
    from fixtures.tiny_flux2 import VARIANTS, write_to_models_dir
    from toyworld import comfy_env

    nodes = comfy_env.get_nodes(extras=True)
    if "AnchorDiffMask" not in nodes.NODE_CLASS_MAPPINGS:  # once per process, as the other test modules do
        assert comfy_env.load_custom_node_pack(REPO), "our pack failed to load in ComfyUI"
    for name, cfg in VARIANTS.items():
        write_to_models_dir(comfy_models_dir, name, cfg)
    pack = comfy_env.pack_module(REPO)
    ns = types.SimpleNamespace(nodes=nodes, pack=pack, models=comfy_models_dir, N=nodes.NODE_CLASS_MAPPINGS,
                               clip=make_klein_fixture_clip() if klein_available() else None,
                               dev_clip=None if mistral_unavailable() else make_flux2_dev_fixture_clip(),
                               flux_clip=make_flux_fixture_clip())
    ns.family = sys.modules[pack.__name__ + ".nodes.models.flux2"].Flux2Adapter.family
    return ns


def load_model(env, name="tiny_flux2_klein"):
    from fixtures.tiny_flux2 import VARIANTS, load_with_comfy
    return load_with_comfy(env.models / "diffusion_models" / f"{name}.safetensors", expect=VARIANTS[name])


def real_encoder(env, name):
    """The fixture CLIP of that variant's text encoder, None where this ComfyUI has none."""
    return env.clip if name == "tiny_flux2_klein" else env.dev_clip


def positive(env, name="tiny_flux2_klein", text="a cat next to a red car"):
    """The prompt's conditioning: Klein's fixture CLIP where there is one, else features given as data;
    FluxGuidance 3.5 for the guidance-distilled dev."""
    from fixtures.tiny_flux2 import VARIANTS
    cfg = VARIANTS[name]
    if real_encoder(env, name) is not None:
        cond = env.nodes.CLIPTextEncode().encode(real_encoder(env, name), text)[0]
    else:
        features = torch.randn(1, 24, cfg.text_dim, generator=torch.Generator().manual_seed(len(text)))
        cond = [[features, {"pooled_output": None}]]  # as CLIPTextEncode gives it (Flux.2's encoders pool nothing)
    return core_node(env.nodes, "FluxGuidance", cond, 3.5) if cfg.guidance else cond


def concepts(env, name="tiny_flux2_klein", text="cat, red car"):
    from fixtures.tiny_flux2 import VARIANTS
    if real_encoder(env, name) is not None:
        return run(env, "AnchorDiffConcepts", real_encoder(env, name), text)[0]
    emb = torch.randn(3, VARIANTS[name].text_dim, generator=torch.Generator().manual_seed(9))
    at = torch.tensor([3, 5, 6]) + TEXT_LEN - 12
    cs_class = sys.modules[env.pack.__name__ + ".anchordiff_core.concepts"].ConceptSet  # the pack's own class
    return cs_class(("cat", "red car"), emb, torch.tensor([0, 1, 1]), env.family, positions=at)


def tokens(x, index=0):
    """A Flux.2 latent [B, 128, H, W] as diffusers takes it: one token per cell [B, N, 128] and its
    positions (index, row, column, 0) [N, 4]."""
    ids = torch.zeros(x.shape[-2], x.shape[-1], 4)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(x.shape[-2])[:, None]
    ids[..., 2] = torch.arange(x.shape[-1])[None, :]
    return x.flatten(2).transpose(1, 2), ids.reshape(-1, 4)


def diffusers_reference(env, model, cs, maps, latent, seed, layers, seg, name, cond, reference=None, timestep_zero=False):
    """The same noisy latent, sigma, (left-padded) prompt features and guidance through diffusers' own Flux.2.
    timestep_zero: the reference modulated at timestep 0, diffusers' KV "extract" mode (references first)."""
    from fixtures.tiny_flux2 import VARIANTS, build_diffusers

    sys.path.insert(0, str(REPO))
    from anchordiff_core.diffusers_flux2 import DiffusersFlux2Recorder

    x = noisy_latent(model, latent, seed, maps.sigma)
    hidden, img_ids = tokens(x)
    extra = {}
    if reference is not None:  # Flux.2's "index" method: the first reference at RoPE index 10
        ref, ref_ids = tokens(model.model.process_latent_in(reference), 10)
        if timestep_zero:
            hidden, img_ids = torch.cat([ref, hidden], 1), torch.cat([ref_ids, img_ids], 0)
            extra = dict(image_offset=ref.shape[1], kv_cache_mode="extract", num_ref_tokens=ref.shape[1],
                         ref_fixed_timestep=0.0)
        else:
            hidden, img_ids = torch.cat([hidden, ref], 1), torch.cat([img_ids, ref_ids], 0)
    text = cond[0][0]
    text = F.pad(text, (0, 0, max(0, TEXT_LEN - text.shape[1]), 0))
    txt_ids = torch.zeros(text.shape[1], 4)
    txt_ids[:, 3] = torch.arange(text.shape[1])
    recorder = DiffusersFlux2Recorder(build_diffusers(VARIANTS[name]), cs, graph_layers=layers, seg4diff_layer=seg)
    guidance = torch.tensor([3.5]) if VARIANTS[name].guidance else None
    return recorder.record(hidden, img_ids, txt_ids, torch.tensor([maps.sigma]), text, guidance,
                           grid=tuple(x.shape[-2:]), image_size=(x.shape[-2] * 16, x.shape[-1] * 16), **extra)


# ------------------------------------------------------------------ the model and the adapter
@pytest.mark.parametrize("name, variant", [
    ("tiny_flux2_dev", "Flux.2-architecture model (guidance-distilled) with 2 double + 2 single blocks"),
    ("tiny_flux2_klein", "Flux.2 Klein (Qwen3 4B text) with 2 double + 2 single blocks")])
def test_comfyui_loads_the_tiny_flux2_and_the_adapter_names_it(env, name, variant):
    adapters = sys.modules[env.pack.__name__ + ".nodes.models"]
    model = load_model(env, name)
    adapter = adapters.adapter_for(model)
    assert type(adapter).__name__ == "Flux2Adapter" and adapter.variant() == variant
    assert not adapters.FluxAdapter.matches(model.model.diffusion_model)
    assert adapter.num_blocks() == 4 and adapter.heads() == 2 and adapter.width() == 256
    assert adapter.block_keys() == [("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)]
    assert adapter.grid((8, 12)) == (8, 12) and adapter.pixels_per_latent == 16  # patch size 1 on 1/16 latents
    assert adapter.default_graph_layers() == (1, 2) and adapter.default_seg4diff_layer() == 1


def test_klein_concepts_come_from_qwen3_at_their_prompt_positions(env):
    if env.clip is None:
        pytest.skip("ComfyUI 0.3.75 ships no Flux.2 Klein text encoder (KleinTokenizer / klein_te)")
    cs = concepts(env, text="cat, red car")
    assert cs.encoder == env.family and cs.embeddings.shape == (3, 7680)
    assert cs.token_concept.tolist() == [0, 1, 1]
    # "<|im_start|>user\n" is 3 tokens, then "cat", the joiner, " red" " car": Klein pads on the right, so
    # the places in the encoded concept string are the RoPE positions
    assert cs.positions.tolist() == [3, 5, 6]
    joined = sys.modules[env.pack.__name__ + ".anchordiff_core.concepts"].join_concepts(["cat", "red car"])
    cond = env.clip.encode_from_tokens(env.clip.tokenize(joined))
    assert torch.equal(cs.embeddings, cond[0, [3, 5, 6]].float())
    with pytest.raises(ValueError, match="text encoders of Flux.1 .*, but the model is Flux.2"):
        record(env, load_model(env), run(env, "AnchorDiffConcepts", env.flux_clip, "cat")[0])
    from fixtures.tiny_flux import FLUX_DEV
    from fixtures.tiny_flux import load_with_comfy as load_flux
    from fixtures.tiny_flux import write_to_models_dir as write_flux
    flux = load_flux(write_flux(env.models, "tiny_flux_dev", FLUX_DEV), expect=FLUX_DEV)
    with pytest.raises(ValueError, match=r"text encoders of Flux.2 \(dev, Klein\), but the model is Flux.1"):
        record(env, flux, cs)


def test_dev_concepts_come_from_mistral_at_their_left_padded_prompt_positions(env):
    if env.dev_clip is None:
        from fixtures.comfy_test_nodes.flux2_clip import mistral_unavailable
        pytest.skip(mistral_unavailable())
    cs = concepts(env, "tiny_flux2_dev", "cat, red car")
    assert cs.encoder == env.family and cs.embeddings.shape == (3, 15360) and cs.token_concept.tolist() == [0, 1, 1]
    joined = sys.modules[env.pack.__name__ + ".anchordiff_core.concepts"].join_concepts(["cat", "red car"])
    tokens = env.dev_clip.tokenize(joined)
    ids = [t[0] for t in tokens["mistral3_24b"][0]]
    at = [len(ids) - 6, len(ids) - 3, len(ids) - 2]  # "cat", " ", ",", " red", " car", "[/INST]" at the end
    assert [ids[p] for p in at] == [277, 285, 287]  # the tiny tekken's "cat", " red", " car"
    cond = env.dev_clip.encode_from_tokens(tokens)  # no padding: [1, len(ids), 15360]
    assert cond.shape[1] == len(ids) < 512 and torch.equal(cs.embeddings, cond[0, at].float())
    # the model sees the prompt left-padded to 512 tokens: these tokens sit at 512 - len(ids) + place
    assert cs.positions.tolist() == [512 - len(ids) + p for p in at]


# ------------------------------------------------------------------ independent cross-check
@pytest.mark.parametrize("name", ["tiny_flux2_dev", "tiny_flux2_klein"])
def test_recorded_maps_equal_diffusers_flux2_holding_the_same_weights(env, name):
    model, cs, cond = load_model(env, name), concepts(env, name), positive(env, name)
    latent = {"samples": torch.randn(1, 128, 8, 12, generator=torch.Generator().manual_seed(1))}
    # graph layers: one double-stream and one single-stream block; Seg4Diff on a double-stream one
    maps = run(env, "AnchorDiffLookAtImage", model, cs, cond, latent, 7, 0.5, "1, 3", 1)[0]
    assert maps.a_ci.shape == (1, 4, 2, 8 * 12) and maps.a_ii.shape == (1, 2, 96, 96) and maps.grid == (8, 12)
    assert maps.image_size == (128, 192) and maps.meta["model"].startswith("Flux.2")
    expected = diffusers_reference(env, model, cs, maps, latent["samples"], 7, (1, 3), 1, name, cond)
    assert_maps_match(maps, expected)
    # not trivially equal: concepts, blocks and layers differ
    assert (maps.a_ci[0, :, 0] - maps.a_ci[0, :, 1]).abs().max() > 1e-3
    assert (maps.a_ci[0, 0] - maps.a_ci[0, 3]).abs().max() > 1e-3
    assert (maps.a_ii[0, 0] - maps.a_ii[0, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("bug", ["image modulation", "text at position 0"])
def test_a_wrong_concept_stream_is_caught_by_the_cross_check(env, monkeypatch, bug):
    """Planted bugs: the concept stream modulated with the image stream's slices instead of the
    prompt's, or the concept tokens rotated at Flux.1's text position 0 instead of theirs: the
    diffusers capture disagrees (so the comparison above can fail)."""
    name = "tiny_flux2_dev"
    model, cs, cond = load_model(env, name), concepts(env, name), positive(env, name)
    latent = {"samples": torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(2))}
    flux2 = sys.modules[env.pack.__name__ + ".nodes.models.flux2"]
    flux = sys.modules[env.pack.__name__ + ".nodes.models.flux"]
    good = run(env, "AnchorDiffLookAtImage", model, cs, cond, latent, 3, 0.5, "0, 3", 0)[0]
    if bug == "image modulation":
        monkeypatch.setattr(flux2.Flux2Adapter, "_text_modulation",
                            lambda self, block, vec, rows: tuple(flux._rows(mod, rows) for mod in vec[0]))
    else:
        original = flux2.Flux2Adapter.concept_rope
        monkeypatch.setattr(flux2.Flux2Adapter, "concept_rope",
                            lambda self, positions, device: original(self, positions * 0, device))
    bad = run(env, "AnchorDiffLookAtImage", model, cs, cond, latent, 3, 0.5, "0, 3", 0)[0]
    expected = diffusers_reference(env, model, cs, good, latent["samples"], 3, (0, 3), 0, name, cond)
    assert_maps_match(good, expected)
    assert relative_error(bad.a_ci, expected.a_ci) > 1e-3


# ------------------------------------------------------------------ the image is unchanged
@pytest.mark.parametrize("name", ["tiny_flux2_dev", "tiny_flux2_klein"])
def test_recorded_image_is_bit_identical_to_a_plain_run(env, name):
    model, cond = load_model(env, name), positive(env, name)
    patched, recorder = record(env, model, concepts(env, name), record_step=2)
    seen = {"patched": [], "plain": []}

    def keep(where):
        return lambda step, x0, x, total: seen[where].append(x0.clone())

    out_p = sample(env, patched, seed=3, callback=keep("patched"), positive=cond, size=(8, 12))
    out_u = sample(env, model, seed=3, callback=keep("plain"), positive=cond, size=(8, 12))
    assert len(seen["patched"]) == 4 and out_p["samples"].shape == (1, 128, 8, 12)
    for step, (a, b) in enumerate(zip(seen["patched"], seen["plain"])):
        assert torch.equal(a, b), f"denoised output differs at step {step}"
    assert torch.equal(out_p["samples"], out_u["samples"])
    maps = read_maps(env, recorder, out_p)
    assert maps.step == 2 and maps.batch_size == 1  # the recording step ran, and still nothing changed
    assert not model.wrappers, "the input MODEL must not carry our wrappers"


# ------------------------------------------------------------------ one forward per step
def test_guidance_distilled_single_forward_records_at_record_at_and_never_serves_stale_maps(env, monkeypatch):
    name = "tiny_flux2_dev"
    model, cond = load_model(env, name), positive(env, name)
    calls = []
    adapter = sys.modules[env.pack.__name__ + ".nodes.models.flux2"].Flux2Adapter
    original = adapter.record_block

    def counting(self, call, index, args, captured):
        calls.append((index, call.rows.tolist()))
        return original(self, call, index, args, captured)

    monkeypatch.setattr(adapter, "record_block", counting)
    patched, recorder = record(env, model, concepts(env, name), record_at=0.5)
    first = sample(env, patched, seed=11, steps=6, positive=cond, size=(8, 8))
    maps = read_maps(env, recorder, first)
    sigmas = model.get_model_object("model_sampling")
    import comfy.samplers
    schedule = comfy.samplers.calculate_sigmas(sigmas, "simple", 6)
    target = float(sigmas.percent_to_sigma(0.5))
    nearest = min(range(6), key=lambda i: (abs(float(schedule[i]) - target), i))
    assert maps.step == nearest and abs(maps.sigma - float(schedule[nearest])) < 1e-6
    assert calls == [(i, [0]) for i in range(4)]  # one call, one (positive) row, every block once
    second = sample(env, patched, seed=12, steps=6, positive=cond, size=(8, 8))
    maps2 = read_maps(env, recorder, second)
    assert maps2.meta["run"] != maps.meta["run"] and not torch.equal(maps2.a_ci, maps.a_ci)
    assert read_maps(env, recorder, first).meta["id"] == maps.meta["id"]  # each latent keeps its own maps
    with pytest.raises(ValueError, match="not produced by a sampler using this recorder's MODEL"):
        read_maps(env, recorder, sample(env, model, seed=13, steps=6, positive=cond, size=(8, 8)))


# ------------------------------------------------------------------ reference images (multi-reference editing)
def test_reference_image_tokens_are_left_out_and_the_image_is_unchanged(env):
    name = "tiny_flux2_klein"
    model, cs = load_model(env, name), concepts(env, name)
    reference = torch.randn(1, 128, 6, 6, generator=torch.Generator().manual_seed(5))
    cond = core_node(env.nodes, "ReferenceLatent", positive(env, name), {"samples": reference})
    patched, recorder = record(env, model, cs, record_at=0.5, graph_layers="1, 3", seg4diff_layer=1)
    out_p = sample(env, patched, seed=4, size=(8, 8), positive=cond)
    out_u = sample(env, model, seed=4, size=(8, 8), positive=cond)
    assert torch.equal(out_p["samples"], out_u["samples"])
    maps = read_maps(env, recorder, out_p)
    assert maps.grid == (8, 8) and maps.a_ii.shape == (1, 2, 64, 64) and maps.a_ci.shape[-1] == 64  # 36 reference tokens left out
    latent = {"samples": torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(6))}
    looked = run(env, "AnchorDiffLookAtImage", model, cs, cond, latent, 2, 0.5, "1, 3", 1)[0]
    expected = diffusers_reference(env, model, cs, looked, latent["samples"], 2, (1, 3), 1, name, cond, reference=reference)
    assert_maps_match(looked, expected)
    plain = run(env, "AnchorDiffLookAtImage", model, cs, positive(env, name), latent, 2, 0.5, "1, 3", 1)[0]
    assert relative_error(plain.a_ii, looked.a_ii) > 1e-3  # the references were seen by the image tokens


def test_timestep_zero_references_record_the_texts_modulation_slot(env):
    """ComfyUI 0.33's "index_timestep_zero" (FluxKontextMultiReferenceLatentMethod): the reference tokens are
    modulated at timestep 0, the single blocks get two modulation slots per row and the concepts use the
    text's. The same maps as diffusers' KV "extract" mode (references first, modulated at timestep 0);
    the image is unchanged."""
    if "index_timestep_zero" not in str(env.N["FluxKontextMultiReferenceLatentMethod"].INPUT_TYPES()):
        pytest.skip("this ComfyUI has no index_timestep_zero reference method (0.33 has it)")
    name = "tiny_flux2_klein"
    model, cs = load_model(env, name), concepts(env, name)
    reference = torch.randn(1, 128, 6, 6, generator=torch.Generator().manual_seed(5))
    cond = core_node(env.nodes, "ReferenceLatent", positive(env, name), {"samples": reference})
    cond = core_node(env.nodes, "FluxKontextMultiReferenceLatentMethod", cond, "index_timestep_zero")
    patched, _recorder = record(env, model, cs, record_at=0.5, graph_layers="1, 3", seg4diff_layer=1)
    assert torch.equal(sample(env, patched, seed=4, size=(8, 8), positive=cond)["samples"],
                       sample(env, model, seed=4, size=(8, 8), positive=cond)["samples"])
    latent = {"samples": torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(6))}
    looked = run(env, "AnchorDiffLookAtImage", model, cs, cond, latent, 2, 0.5, "1, 3", 1)[0]
    expected = diffusers_reference(env, model, cs, looked, latent["samples"], 2, (1, 3), 1, name, cond, reference=reference,
                                   timestep_zero=True)
    assert_maps_match(looked, expected)
    indexed = core_node(env.nodes, "ReferenceLatent", positive(env, name), {"samples": reference})
    plain = run(env, "AnchorDiffLookAtImage", model, cs, indexed, latent, 2, 0.5, "1, 3", 1)[0]
    assert relative_error(plain.a_ii, looked.a_ii) > 1e-3  # timestep 0 changed what the image tokens saw


# ------------------------------------------------------------------ errors
def test_bad_inputs_get_a_clear_error(env):
    adapters = sys.modules[env.pack.__name__ + ".nodes.models"]
    name = "tiny_flux2_dev"
    model = load_model(env, name)
    with pytest.raises(ValueError, match="out of range: this Flux.2-architecture .* has 4 joint blocks"):
        record(env, model, concepts(env, name), graph_layers="0, 4")
    cs = concepts(env, name)
    no_positions = type(cs)(cs.names, cs.embeddings, cs.token_concept, cs.encoder)
    patched, recorder = record(env, model, no_positions, record_step=0)
    with pytest.raises(ValueError, match="carry no Flux.2 text positions; encode them again"):
        read_maps(env, recorder, sample(env, patched, seed=1, steps=1, positive=positive(env, name), size=(8, 8)))
    # a Flux.2-architecture model of another layout: refused, naming what differs and the supported families
    dm = model.model.diffusion_model
    odd = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=dm))
    monkey = dm.patch_size
    try:
        dm.patch_size = 2
        with pytest.raises(ValueError, match=r"Flux.2-architecture model with patch size 2, unlike Flux.2 dev / Klein.*"
                                             r"Supported families: .*Flux.2 \(dev, Klein\)"):
            adapters.adapter_for(odd)
    finally:
        dm.patch_size = monkey
