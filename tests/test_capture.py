"""Attention capture inside a real (vendored) ComfyUI, with tiny SD3 models built at test time.

Checks the recording patch against an independent implementation (diffusers), that it never
changes the image, the CFG / batch / odd-size layouts, stale-map protection, the errors users
see, and the whole node chain through ComfyUI's own executor.
"""
import contextlib
import re
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from fixtures import node_chain
from fixtures.node_chain import read_maps, record, run

REPO = Path(__file__).resolve().parents[1]
VARIANT_NAMES = ["tiny_sd3", "tiny_sd35", "tiny_sd35m"]


@pytest.fixture(scope="module")
def env(comfy, comfy_models_dir):
    from toyworld import comfy_env
    from fixtures.comfy_base import TEST_NODES_DIR

    nodes = comfy_env.get_nodes(extras=True)
    assert comfy_env.load_custom_node_pack(REPO), "our pack failed to load in ComfyUI"
    assert comfy_env.load_custom_node_pack(TEST_NODES_DIR)
    pack = comfy_env.pack_module(REPO)
    from toyworld.comfy_clip import make_fixture_clip

    clip = make_fixture_clip()
    ns = types.SimpleNamespace(nodes=nodes, pack=pack, clip=clip, models=comfy_models_dir, N=nodes.NODE_CLASS_MAPPINGS)
    ns.pos = nodes.CLIPTextEncode().encode(clip, "a cat next to a dog")[0]
    ns.neg = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    return ns


def load_model(env, name="tiny_sd3"):
    from fixtures.tiny_sd3 import VARIANTS, load_with_comfy

    return load_with_comfy(env.models / "diffusion_models" / f"{name}.safetensors", expect=VARIANTS[name])


def concepts(env, text="cat, dog"):
    return run(env, "AnchorDiffConcepts", env.clip, text)[0]


def sample(env, model, seed=0, steps=4, cfg=3.0, size=(32, 32), batch=1, negative=None, denoise=1.0, latent=None, callback=None,
           scheduler="simple", last_step=None, positive=None):
    import comfy.sample
    import comfy.samplers

    latent = latent if latent is not None else torch.zeros(batch, 16, *size)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(
        model, noise, steps, cfg, "euler", scheduler, positive if positive is not None else env.pos,
        negative if negative is not None else env.neg,
        latent, denoise=denoise, callback=callback, disable_pbar=True, seed=seed, last_step=last_step,
    )
    return {"samples": samples}


@contextlib.contextmanager
def refused(match):
    """pytest.raises(ValueError, match=...) that also checks the wording: one full stop at the end,
    never two in a row ("...use record_step.." when a reason ending in '.' is put into a sentence)."""
    with pytest.raises(ValueError, match=match) as info:
        yield info
    message = str(info.value)
    assert not re.search(r"\.\.(?!\d)", message), f"doubled full stop in: {message}"
    assert not message.rstrip().endswith(("..", ". .")), message


def assert_maps_close(a, b, atol=1e-4):
    for name in ("a_ci", "ca_scores", "a_ii", "o_ii", "seg4diff"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4, msg=name)


# ------------------------------------------------------------------ independent cross-check
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_recorded_maps_equal_an_independent_diffusers_capture(env, variant):
    import comfy.sample
    from fixtures.tiny_sd3 import VARIANTS, build_diffusers

    sys.path.insert(0, str(REPO))
    from anchordiff_core.diffusers_sd3 import DiffusersSD3Recorder

    model = load_model(env, variant)
    cs = concepts(env, "cat, red car")
    depth = VARIANTS[variant].depth
    layers = f"0, {depth - 1}"
    latent = {"samples": torch.randn(1, 16, 16, 24, generator=torch.Generator().manual_seed(1))}
    maps = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 7, 0.5, layers, 1)[0]
    # the same noisy latent, timestep and conditioning, through diffusers' own SD3 implementation
    sigma = maps.sigma
    noise = comfy.sample.prepare_noise(latent["samples"], 7)
    x = sigma * noise + (1 - sigma) * model.model.process_latent_in(latent["samples"])
    reference = DiffusersSD3Recorder(build_diffusers(VARIANTS[variant]), cs, graph_layers=(0, depth - 1), seg4diff_layer=1)
    expected = reference.record(x, torch.tensor([sigma * 1000.0]), env.pos[0][0], env.pos[0][1]["pooled_output"])
    assert maps.a_ci.shape == (1, depth, 2, 8 * 12) and maps.a_ii.shape == (1, 2, 96, 96)
    assert_maps_close(maps, expected, atol=1e-4)
    # not trivially equal: the two concepts and two layers differ
    assert (maps.a_ci[0, :, 0] - maps.a_ci[0, :, 1]).abs().max() > 1e-3
    assert (maps.a_ii[0, 0] - maps.a_ii[0, 1]).abs().max() > 1e-3


# ------------------------------------------------------------------ the image is unchanged
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_patched_model_denoises_exactly_like_the_original(env, variant):
    model = load_model(env, variant)
    patched, recorder = record(env, model, concepts(env), record_step=2)
    seen = {"patched": [], "plain": []}

    def keep(where):
        return lambda step, x0, x, total: seen[where].append(x0.clone())

    out_p = sample(env, patched, seed=3, steps=4, callback=keep("patched"))
    out_u = sample(env, model, seed=3, steps=4, callback=keep("plain"))
    assert len(seen["patched"]) == 4
    for step, (a, b) in enumerate(zip(seen["patched"], seen["plain"])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"denoised output differs at step {step}")
    torch.testing.assert_close(out_p["samples"], out_u["samples"], atol=1e-6, rtol=0)
    maps = read_maps(env, recorder, out_p)
    assert maps.step == 2  # the recording step ran, and still nothing changed


def test_input_model_stays_untouched(env):
    model = load_model(env)
    patched, _ = record(env, model, concepts(env))
    assert patched is not model
    assert not model.wrappers, "the input MODEL must not carry our wrappers"


# ------------------------------------------------------------------ CFG, batch, sizes
def test_cfg_layouts_record_the_same_positive_maps(env):
    model = load_model(env)
    cs = concepts(env)
    # step 0 sees the same noisy latent whatever the guidance, so maps are comparable
    long_negative = env.nodes.CLIPTextEncode().encode(env.clip, ", ".join(["ugly blurry"] * 40))[0]
    assert long_negative[0][0].shape[1] != env.pos[0][0].shape[1]  # forces separate cond/uncond calls
    results = {}
    for name, cfg, negative in (("batched", 3.0, env.neg), ("separate", 3.0, long_negative), ("cfg1", 1.0, env.neg)):
        patched, recorder = record(env, model, cs, record_step=0)
        results[name] = read_maps(env, recorder, sample(env, patched, seed=5, steps=3, cfg=cfg, negative=negative))
    assert_maps_close(results["batched"], results["separate"], atol=1e-5)
    assert_maps_close(results["batched"], results["cfg1"], atol=1e-5)


def test_batch_of_two_records_one_set_of_maps_per_image(env):
    import comfy.sample

    model = load_model(env)
    cs = concepts(env)
    patched, recorder = record(env, model, cs, record_step=1)
    both = sample(env, patched, seed=11, batch=2)
    maps = read_maps(env, recorder, both)
    assert maps.batch_size == 2
    assert (maps.a_ii[0] - maps.a_ii[1]).abs().max() > 1e-4  # different images, different maps
    # the second image alone (its own noise) records the same maps as in the batch
    noise = comfy.sample.prepare_noise(torch.zeros(2, 16, 32, 32), 11)[1:]
    alone = comfy.sample.sample(patched, noise, 4, 3.0, "euler", "simple", env.pos, env.neg, torch.zeros(1, 16, 32, 32), disable_pbar=True)
    single = read_maps(env, recorder, {"samples": alone})
    assert_maps_close(single, maps.select([1]), atol=1e-5)
    # a LATENT holding only image 2 of the batch (LatentFromBatch) reads image 2's maps
    second = env.nodes.LatentFromBatch().frombatch(both, 1, 1)[0]
    assert_maps_close(read_maps(env, recorder, second), maps.select([1]), atol=0)


def test_image_k_of_a_batch_equals_image_k_alone_at_every_node(env):
    model = load_model(env)
    patched, recorder = record(env, model, concepts(env, "cat, dog"))
    both = sample(env, patched, seed=12, batch=2)

    def chain(maps):
        anchors = run(env, "AnchorDiffAnchorSelect", maps, 2, 4.0, 0.3, "", False)[0]
        graph = run(env, "AnchorDiffBuildGatedGraph", maps, 98.0, "", True)[0]
        heat = run(env, "AnchorDiffPropagate", graph, anchors, 20)[0]
        return {
            "anchors": anchors.indices, "graph": [g.transition_t.to_dense() for g in graph.graphs], "heat": heat.values,
            "mask": run(env, "AnchorDiffMask", heat, "", "mean", 0.5), "dog": run(env, "AnchorDiffMask", heat, "dog", "otsu", 0.5),
            "cross_attention": run(env, "AnchorDiffCrossAttentionHeat", maps, "")[0].values,
            "conceptattention": run(env, "AnchorDiffConceptAttentionHeat", maps, True, "")[0].values,
            "seg4diff": run(env, "AnchorDiffSeg4DiffHeat", maps)[0].values,
        }

    batch = chain(read_maps(env, recorder, both))
    assert batch["mask"][0].shape == (4, 256, 256)  # image-major: image 1's cat, dog, then image 2's
    assert not torch.equal(batch["mask"][0][:2], batch["mask"][0][2:])  # the two images differ
    assert not torch.equal(batch["graph"][0], batch["graph"][1])
    for k in range(2):
        alone = chain(read_maps(env, recorder, env.nodes.LatentFromBatch().frombatch(both, k, 1)[0]))
        assert torch.equal(alone["anchors"][0], batch["anchors"][k]), k
        assert torch.equal(alone["graph"][0], batch["graph"][k]), k
        for name in ("heat", "cross_attention", "conceptattention", "seg4diff"):
            assert torch.equal(alone[name][0], batch[name][k]), (name, k)
        for output in range(2):  # mask and soft_mask
            assert torch.equal(alone["mask"][output], batch["mask"][output][2 * k:2 * k + 2]), k
            assert torch.equal(alone["dog"][output][0], batch["dog"][output][k]), k


def test_several_positive_conditionings_record_their_mean(env):
    """ConditioningCombine: both prompts go through one model call; the maps are the mean of the
    two prompts' maps (the design's promise). Step 0: every run sees the same noisy latent."""
    model = load_model(env)
    cs = concepts(env)
    prompt_a = env.pos
    prompt_b = env.nodes.CLIPTextEncode().encode(env.clip, "a red car on a wet road")[0]  # (the same words reordered
    # would give the same maps: SD3's prompt tokens carry no position)
    combined = env.nodes.ConditioningCombine().combine(prompt_a, prompt_b)[0]
    maps = {}
    for name, positive in (("a", prompt_a), ("b", prompt_b), ("both", combined)):
        patched, recorder = record(env, model, cs, record_step=0)
        maps[name] = read_maps(env, recorder, sample(env, patched, seed=6, positive=positive))
    for field in ("a_ci", "ca_scores", "a_ii", "o_ii", "seg4diff"):
        a, b, both = (getattr(maps[n], field) for n in ("a", "b", "both"))
        assert (a - b).abs().max() > 1e-3, field  # the prompts' maps differ
        torch.testing.assert_close(both, (a + b) / 2, atol=1e-5, rtol=1e-4, msg=field)


def test_odd_latent_and_non_square_image(env):
    model = load_model(env)
    patched, recorder = record(env, model, concepts(env))
    latent = sample(env, patched, size=(33, 25))  # 264 x 200 px: padded to 34 x 26 latent
    maps = read_maps(env, recorder, latent)
    assert maps.grid == (17, 13) and maps.image_size == (264, 200)
    anchors = run(env, "AnchorDiffAnchorSelect", maps, 1, 8.0, 0.5, "dog: 199, 263", False)[0]
    assert anchors.indices[0][1, 0].item() == 16 * 13 + 12  # bottom-right token
    graph = run(env, "AnchorDiffBuildGatedGraph", maps, 98.0, "", True)[0]
    heat = run(env, "AnchorDiffPropagate", graph, anchors, 40)[0]
    mask, soft = run(env, "AnchorDiffMask", heat, "", "mean", 0.5)
    assert mask.shape == (2, 264, 200) and soft.shape == (2, 264, 200)
    # refine_edges: the mask follows the image's edges (here a vertical one at x = 100), not 16 px tokens
    image = torch.zeros(1, 264, 200, 3)
    image[:, :, 100:] = 1.0
    edged, edged_soft = run(env, "AnchorDiffMask", heat, "", "mean", 0.5, image, True, 16)
    assert edged.shape == (2, 264, 200) and set(edged.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(edged, mask) and not torch.equal(edged_soft, soft)
    across = (edged[:, :, 1:] != edged[:, :, :-1]).float().mean((0, 1))  # how often the mask switches per column
    assert across[99] > 0.1 and across[99] == across.max()
    # refine_edges is on by default and needs the image: without one the mask keeps its token blocks
    assert torch.equal(run(env, "AnchorDiffMask", heat, "", "mean", 0.5, None, True, 16)[0], mask)
    assert torch.equal(run(env, "AnchorDiffMask", heat, "", "mean", 0.5, image, False, 16)[0], mask)
    assert torch.equal(run(env, "AnchorDiffMask", heat, "", "mean", 0.5, image)[0], edged)


# ------------------------------------------------------------------ stale maps, step selection
def test_maps_always_belong_to_the_latent_they_are_read_with(env):
    model = load_model(env)
    patched, recorder = record(env, model, concepts(env), keep_runs=2)
    first = sample(env, patched, seed=1)
    maps_first = read_maps(env, recorder, first)
    second = sample(env, patched, seed=2)
    maps_second = read_maps(env, recorder, second)
    assert (maps_first.a_ii - maps_second.a_ii).abs().max() > 1e-4
    assert read_maps(env, recorder, first) is maps_first  # still held, and still its own
    sample(env, patched, seed=3)  # a third run pushes the first out (keep_runs=2)
    with refused("only the last 2 run"):
        read_maps(env, recorder, first)
    with refused("not produced by a sampler using this recorder"):
        read_maps(env, recorder, {"samples": torch.zeros(1, 16, 32, 32)})
    _, fresh = record(env, model, concepts(env))
    with refused("No sampling run has used"):
        read_maps(env, fresh, second)


def test_denoised_output_of_sampler_custom_advanced_says_what_to_connect(env):
    model = load_model(env)
    patched, recorder = record(env, model, concepts(env), record_step=1)
    noise = run(env, "RandomNoise", 5)[0]
    guider = run(env, "CFGGuider", patched, env.pos, env.neg, 3.0)[0]
    sigmas = run(env, "BasicScheduler", patched, "sgm_uniform", 4, 1.0)[0][:3]  # the first two steps (SplitSigmas)
    output, denoised = run(env, "SamplerCustomAdvanced", noise, guider, run(env, "KSamplerSelect", "euler")[0], sigmas,
                           {"samples": torch.zeros(1, 16, 32, 32)})
    assert not torch.equal(output["samples"], denoised["samples"])  # (equal when sampling ends at sigma 0)
    assert read_maps(env, recorder, output).step == 1
    with refused(r"SamplerCustomAdvanced's 'denoised_output'\), not the image it sampled\. Connect the sampler's 'output' LATENT"):
        read_maps(env, recorder, denoised)


def test_recording_step_that_never_ran_is_reported(env):
    model = load_model(env)
    patched, recorder = record(env, model, concepts(env), record_step=10)
    latent = sample(env, patched, steps=4)
    with refused(r"recording step 10 never ran: the sampler ran 4 step\(s\) \(0\.\.3\)\. Lower 'record_step'"):
        read_maps(env, recorder, latent)


# record_at 0.5 -> sigma 0.75 (SD3's shift 3); 0.25 -> 0.9; 0.75 -> 0.5. Expected steps read off
# ComfyUI's own sigma tables (printed in the failure message): nearest sampled sigma, ties earlier.
RECORDING_POINTS = [
    # scheduler, steps, record_at, expected step, its sigma
    ("simple", 2, 0.5, 1, 0.75), ("simple", 4, 0.5, 2, 0.75), ("simple", 8, 0.5, 4, 0.75), ("simple", 28, 0.5, 14, 0.75),
    ("sgm_uniform", 2, 0.5, 1, 0.7511), ("sgm_uniform", 4, 0.5, 2, 0.7511), ("sgm_uniform", 8, 0.5, 4, 0.7511),
    ("sgm_uniform", 28, 0.5, 14, 0.7511),
    ("beta", 2, 0.5, 1, 0.7507), ("beta", 4, 0.5, 2, 0.7507), ("beta", 8, 0.5, 4, 0.7507), ("beta", 28, 0.5, 14, 0.7507),
    ("normal", 2, 0.5, 0, 1.0), ("normal", 4, 0.5, 1, 0.8577), ("normal", 8, 0.5, 3, 0.8008), ("normal", 28, 0.5, 14, 0.7371),
    ("simple", 4, 0.25, 1, 0.9), ("sgm_uniform", 8, 0.25, 2, 0.9004), ("beta", 28, 0.25, 9, 0.8952),
    ("simple", 4, 0.75, 3, 0.5), ("sgm_uniform", 8, 0.75, 6, 0.503), ("normal", 28, 0.75, 20, 0.5151),
]


@pytest.mark.parametrize("scheduler, steps, record_at, step, sigma", RECORDING_POINTS)
def test_recording_step_is_the_sampled_sigma_nearest_the_target(env, scheduler, steps, record_at, step, sigma):
    import comfy.samplers

    model_patch = sys.modules[env.pack.__name__ + ".nodes.model_patch"]
    model_sampling = load_model(env).get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).tolist()
    got, got_sigma, reason = model_patch.choose_recording_step(sigmas, record_at, -1, model_sampling.percent_to_sigma)
    table = [round(s, 4) for s in sigmas]
    assert (got, reason) == (step, ""), f"{scheduler} {steps} steps, sigmas {table}"
    assert got_sigma == pytest.approx(sigma, abs=1e-4)


def test_recording_step_ties_go_to_the_earlier_step_and_a_far_target_is_refused(env):
    model_patch = sys.modules[env.pack.__name__ + ".nodes.model_patch"]
    choose = model_patch.choose_recording_step
    target = lambda p: 1.5 * (1 - p)  # noqa: E731 -- a schedule where record_at 0.5 is sigma 0.75 exactly
    assert choose([1.0, 0.8, 0.7, 0.0], 0.5, -1, target)[:2] == (1, 0.8)  # 0.8 and 0.7 are both 0.05 away
    assert choose([1.0, 0.7, 0.8, 0.0], 0.5, -1, target)[:2] == (1, 0.7)
    assert choose([1.0, 0.0], 0.5, -1, target)[:2] == (0, 1.0)  # one step: sigma 1 is nearer than the end
    assert choose([1.0, 0.95, 0.7], 0.5, -1, target)[0] is None  # the run's end (0.7) is nearer the target than its last step
    assert choose([0.7, 0.55, 0.0], 0.5, -1, target)[:2] == (0, 0.7)  # within half a step above the start
    step, _, reason = choose([0.7, 0.65, 0.0], 0.5, -1, target)  # 0.05 above a run of 0.05 steps
    assert step is None and "starts at sigma 0.700" in reason and "raise record_at" in reason


def test_recording_point_through_the_samplers(env, caplog):
    import logging

    model = load_model(env)
    cs = concepts(env)
    # the shipped workflows' scheduler: no sampled sigma equals 0.75, step 2 (0.7511) is nearest
    patched, recorder = record(env, model, cs)
    bar = []  # what the sampler's progress bar shows: ComfyUI's callback step + 1, of the total
    with caplog.at_level(logging.INFO):
        latent = sample(env, patched, steps=4, scheduler="sgm_uniform", callback=lambda step, x0, x, total: bar.append(f"{step + 1}/{total}"))
    maps = read_maps(env, recorder, latent)
    assert (maps.step, round(maps.sigma, 4)) == (2, 0.7511)
    text = env.N["AnchorDiffReadMaps"].execute(recorder, latent).ui.as_dict()["text"][0]
    assert text == "recorded step 3/4 of the sampler (record_step 2) at sigma 0.7511 (record_at=0.5)"
    # one convention everywhere: the log says the same, and the bar's 3/4 is the recorded step
    assert "AnchorDiff: recording step 3/4 of the sampler (record_step 2) at sigma 0.7511 (record_at=0.5)" in caplog.messages
    assert bar[maps.step] == "3/4"
    # KSamplerAdvanced ending at step 5 of 8: its last sampled step (4) is at 0.7511
    maps = read_maps(env, recorder, sample(env, patched, steps=8, scheduler="sgm_uniform", last_step=5))
    assert (maps.step, round(maps.sigma, 4), maps.meta["sampled_steps"]) == (4, 0.7511, 5)
    # ... ending at step 3 of 8 stops at sigma 0.9004: lower record_at (to 0.24) or sample further
    latent = sample(env, patched, steps=8, scheduler="sgm_uniform", last_step=3)
    with refused(r"end at sigma 0\.900, with more noise\. Use more steps \(or a later end_at_step\), "
                                         r"or lower record_at to 0\.24 or less, or use record_step\.$"):
        read_maps(env, recorder, latent)
    patched_024, recorder_024 = record(env, model, cs, record_at=0.24)
    maps = read_maps(env, recorder_024, sample(env, patched_024, steps=8, scheduler="sgm_uniform", last_step=3))
    assert (maps.step, round(maps.sigma, 4)) == (2, 0.9004)


def test_img2img_advice_points_the_right_way(env):
    """Denoise 0.5 with euler/normal starts at sigma 0.694: record_at 0.4 (sigma 0.818) lies above the
    run; the advice is to RAISE record_at (or denoise), and following it records."""
    model = load_model(env)
    cs = concepts(env)
    start = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(3))

    def img2img(record_at):
        patched, recorder = record(env, model, cs, record_at=record_at)
        return recorder, sample(env, patched, steps=4, scheduler="normal", denoise=0.5, latent=start)

    for record_at in (0.4, 0.3):  # lowering record_at moves the target further above the run
        recorder, latent = img2img(record_at)
        with refused(r"starts at sigma 0\.694, with less noise \(img2img: denoise below 1\)\. "
                                             r"Raise denoise, or raise record_at to 0\.57 or more, or use record_step\.$"):
            read_maps(env, recorder, latent)
    for record_at in (0.57, 0.6):
        recorder, latent = img2img(record_at)
        assert read_maps(env, recorder, latent).step == 0


def test_advice_that_no_record_at_can_follow_is_not_given(env):
    """ddim_uniform at 1 step samples only sigma 0.006 (denoise 1): no record_at (0.99 is sigma 0.029)
    reaches it, so the advice is record_step, and record_step 0 records."""
    model = load_model(env)
    cs = concepts(env)
    for record_at in (0.5, 0.99):
        patched, recorder = record(env, model, cs, record_at=record_at)
        latent = sample(env, patched, steps=1, scheduler="ddim_uniform")
        with refused(r"starts at sigma 0\.006, below the noise level of every record_at \(0\.99 is sigma 0\.029\)\. "
                     r"Use record_step \(0, the only step\), or more steps or another scheduler\.$") as info:
            read_maps(env, recorder, latent)
        assert "raise record_at" not in str(info.value) and "denoise" not in str(info.value)
    patched, recorder = record(env, model, cs, record_step=0)
    maps = read_maps(env, recorder, sample(env, patched, steps=1, scheduler="ddim_uniform"))
    assert (maps.step, round(maps.sigma, 3)) == (0, 0.006)


def test_a_non_finite_sigma_is_reported_when_recording(env):
    """kl_optimal at 1 step: ComfyUI's schedule is [nan, 0]. Read Maps says so (not Anchor Select, later)."""
    model = load_model(env)
    cs = concepts(env)
    for record_at, record_step in ((0.5, -1), (0.5, 0)):
        patched, recorder = record(env, model, cs, record_at=record_at, record_step=record_step)
        latent = sample(env, patched, steps=1, scheduler="kl_optimal")
        with refused(r"the sampler's noise schedule holds a non-finite sigma \(nan at step 0 of 1; kl_optimal at 1 step does "
                     r"this\), so the model ran on NaN and the image is broken too\. Use more steps or another scheduler\.$"):
            read_maps(env, recorder, latent)


@pytest.mark.parametrize("width, height", [(1000, 600), (776, 1032)])
def test_sizes_that_are_not_multiples_of_16_px_record_the_padded_grid(env, width, height):
    """A 1000 x 600 image: latent 125 x 75, padded by the model to 126 x 76, so 63 x 38 tokens
    covering 1008 x 608 px; the maps say so, and Mask returns the image's own size (the padding
    cropped: tests/test_odd_sizes.py checks where)."""
    model = load_model(env)
    patched, recorder = record(env, model, concepts(env), record_step=0)
    maps = read_maps(env, recorder, sample(env, patched, steps=1, size=(height // 8, width // 8)))
    assert maps.grid == (-(-height // 16), -(-width // 16)) and maps.image_size == (height, width)
    heat = run(env, "AnchorDiffCrossAttentionHeat", maps, "")[0]
    mask, soft = run(env, "AnchorDiffMask", heat, "", "mean", 0.5)
    assert mask.shape == soft.shape == (2, height, width)


def test_interrupt_stops_the_recording_step_inside_a_block(env, monkeypatch):
    """ComfyUI's interrupt flag, set as a graph layer's self-attention starts, stops it after its
    first chunk (the recorder passes ComfyUI's check down), not at the end of the block."""
    import comfy.model_management

    recorder_module = sys.modules[env.pack.__name__ + ".anchordiff_core.recorder"]
    real, finished = recorder_module.image_self_attention, []

    def interrupted_attention(*args, **kwargs):
        comfy.model_management.interrupt_current_processing(True)
        out = real(*args, **kwargs)
        finished.append(True)
        return out

    monkeypatch.setattr(recorder_module, "image_self_attention", interrupted_attention)
    patched, recorder = record(env, load_model(env), concepts(env), record_step=0)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            sample(env, patched, steps=2)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert finished == []


def test_maps_of_different_steps_differ(env):
    model = load_model(env)
    cs = concepts(env)
    recorded = []
    for step in (0, 2):
        patched, recorder = record(env, model, cs, record_step=step)
        recorded.append(read_maps(env, recorder, sample(env, patched, seed=4, steps=4)))
    assert [m.step for m in recorded] == [0, 2] and recorded[0].sigma > recorded[1].sigma
    for name in ("a_ci", "a_ii", "o_ii", "ca_scores"):
        assert (getattr(recorded[0], name) - getattr(recorded[1], name)).abs().max() > 1e-3, name
    # and record_at=0.5 with 4 "simple" steps gives step 2's maps, not step 0's
    patched, recorder = record(env, model, cs)
    assert_maps_close(read_maps(env, recorder, sample(env, patched, seed=4, steps=4)), recorded[1], atol=1e-6)


def test_interrupted_run_leaves_no_maps_and_the_next_run_works(env):
    import comfy.model_management

    model = load_model(env)
    patched, recorder = record(env, model, concepts(env), record_step=1)

    def interrupt(step, x0, x, total):
        if step == 2:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(env, patched, seed=4, callback=interrupt)
    assert recorder._active is None and not recorder._outcomes
    maps = read_maps(env, recorder, sample(env, patched, seed=4))
    assert maps.step == 1


# ------------------------------------------------------------------ concepts as users type them
@pytest.mark.parametrize("text, names", [
    ("c++, python", ("c++", "python")), ("python, c++", ("python", "c++")), ("dog!, cat", ("dog!", "cat")),
    ("🐱, 🐶", ("🐱", "🐶")), ("cat?; a dog.", ("cat?", "a dog.")), ("猫，狗、鸟；red car", ("猫", "狗", "鸟", "red car")),
])
def test_concepts_with_symbols_emoji_and_full_width_separators(env, text, names):
    cs = concepts(env, text)
    assert cs.names == names
    for k, name in enumerate(names):
        # all of a concept's tokens and only its own: the fixture encoder gives a token the same
        # vector in any context, so they must equal the concept encoded alone
        torch.testing.assert_close(cs.embeddings[cs.token_concept == k], concepts(env, name).embeddings, atol=0, rtol=0)


def test_multi_token_concepts_keep_every_token(env):
    cs = concepts(env, "cat, red sports car")
    assert cs.token_concept.tolist() == [0, 1, 1, 1]
    parts = concepts(env, "cat, red, sports, car")
    torch.testing.assert_close(cs.embeddings, parts.embeddings, atol=0, rtol=0)
    # the concept stream sees the same tokens either way, so "red sports car"'s maps are the mean of
    # its words' maps (a concept's tokens averaged, eq. 5 and ConceptAttention)
    model = load_model(env)
    latent = {"samples": torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))}
    whole = run(env, "AnchorDiffLookAtImage", model, cs, env.pos, latent, 3, 0.5, "", -1)[0]
    split = run(env, "AnchorDiffLookAtImage", model, parts, env.pos, latent, 3, 0.5, "", -1)[0]
    for name in ("a_ci", "seg4diff"):
        got, words = getattr(whole, name), getattr(split, name)
        torch.testing.assert_close(got.select(-2, 0), words.select(-2, 0), atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(got.select(-2, 1), words.narrow(-2, 1, 3).mean(dim=-2), atol=1e-6, rtol=1e-5, msg=name)
    assert (split.a_ci[..., 1, :] - split.a_ci[..., 3, :]).abs().max() > 1e-4  # the words' maps differ


def test_concept_names_ignore_case_in_mask_and_manual_anchors(env):
    model = load_model(env)
    patched, recorder = record(env, model, concepts(env, "cat, Red Car"))
    maps = read_maps(env, recorder, sample(env, patched))
    lower = run(env, "AnchorDiffAnchorSelect", maps, 1, 8.0, 0.5, "red car: 200, 100", False)[0]
    upper = run(env, "AnchorDiffAnchorSelect", maps, 1, 8.0, 0.5, "RED CAR: 200, 100\nCat: 10, 10", False)[0]
    assert lower.manual == (False, True) and upper.manual == (True, True)
    assert lower.indices[0][1, 0] == upper.indices[0][1, 0] == 6 * 16 + 12
    heat = run(env, "AnchorDiffPropagate", run(env, "AnchorDiffBuildGatedGraph", maps, 98.0, "", True)[0], upper, 10)[0]
    both = run(env, "AnchorDiffMask", heat, "", "mean", 0.5)[0]
    for typed in ("red car", "RED CAR", " Red Car ", "2"):
        assert torch.equal(run(env, "AnchorDiffMask", heat, typed, "mean", 0.5)[0], both[1:2]), typed
    assert torch.equal(run(env, "AnchorDiffMask", heat, "CAT", "mean", 0.5)[0], both[0:1])


def test_maps_are_found_for_an_fp16_latent(env, monkeypatch):
    """ComfyUI's --fp16-intermediates (0.12 and later) hands the sampler's LATENT on in fp16; Read Maps
    must still find its maps, and still refuse a latent that differs by more than that rounding."""
    import comfy.cli_args
    import comfy.model_management

    model = load_model(env)
    patched, recorder = record(env, model, concepts(env))
    if hasattr(comfy.model_management, "intermediate_dtype"):  # this ComfyUI has the option: use it
        monkeypatch.setattr(comfy.cli_args.args, "fp16_intermediates", True)
        latent = sample(env, patched, seed=6)
    else:  # older ComfyUI: the same cast, done here
        latent = {"samples": sample(env, patched, seed=6)["samples"].half()}
    assert latent["samples"].dtype == torch.float16
    maps = read_maps(env, recorder, latent)
    assert maps is recorder.last_run_maps()
    # the fp32 latent of the same run (a node casting back up) finds the same maps
    assert read_maps(env, recorder, {"samples": latent["samples"].float()}) is maps
    nudged = latent["samples"].float() + 1e-2 * latent["samples"].float().abs().max()
    with pytest.raises(ValueError, match="not produced by a sampler using this recorder"):
        read_maps(env, recorder, {"samples": nudged.half()})


def test_concurrent_model_calls_record_once_and_completely(env, monkeypatch):
    """ComfyUI 0.33 runs a step's model calls in threads for multi-GPU work units
    (_calc_cond_batch_multigpu). Here, as there, each conditioning entry is evaluated by a thread of
    its own; a barrier inside the recorder's wrapper holds a step's calls until all have passed its
    decision, so two positive calls and the negative one run the recording step at once."""
    import comfy.patcher_extension as ext
    import comfy.sample

    def calc_cond_batch_in_threads(executor, model, conds, x_in, timestep, model_options):
        jobs = [(i, entry) for i, cond in enumerate(conds) if cond is not None for entry in cond]
        barrier = threading.Barrier(len(jobs), timeout=120)
        options = {**model_options, "transformer_options": {**model_options.get("transformer_options", {}),
                                                            "test_barrier": barrier}}
        outputs, errors = [[] for _ in conds], []

        def job(i, entry):
            try:
                only = [[entry] if j == i else None for j in range(len(conds))]
                outputs[i].append(executor(model, only, x_in, timestep, options)[i])
            except BaseException as error:  # noqa: BLE001  (re-raised in the sampler's thread)
                errors.append(error)
                barrier.abort()

        threads = [threading.Thread(target=job, args=j) for j in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return [torch.stack(out).mean(0) if out else torch.zeros_like(x_in) for out in outputs]  # full-image entries

    def held(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        transformer_options["test_barrier"].wait()
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    step_recorder = sys.modules[env.pack.__name__ + ".nodes.model_patch"].StepRecorder
    finish, finished = step_recorder.finish, []
    monkeypatch.setattr(step_recorder, "finish", lambda self, *a, **kw: finished.append(1) or finish(self, *a, **kw))

    model, cs = load_model(env), concepts(env)
    other = env.nodes.CLIPTextEncode().encode(env.clip, "a dog on a sofa")[0]

    def maps_of(positive, threads: bool):
        patched, recorder = record(env, model, cs, record_step=0)
        if threads:  # added after the recorder's wrappers, so inside them
            patched.add_wrapper_with_key(ext.WrappersMP.CALC_COND_BATCH, "test", calc_cond_batch_in_threads)
            patched.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, "test", held)
        latent = torch.zeros(1, 16, 32, 32)
        samples = comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 13), 2, 3.0, "euler", "simple",
                                      positive, env.neg, latent, disable_pbar=True, seed=13)
        return read_maps(env, recorder, {"samples": samples})

    both = maps_of(env.pos + other, threads=True)  # two full-image positive entries, as ConditioningCombine makes
    assert len(finished) == 1, f"{len(finished)} concurrent model calls recorded the step"
    # the maps are those of one positive call, complete: that entry recorded alone
    alone = [maps_of(env.pos, threads=False), maps_of(other, threads=False)]
    diffs = [max((getattr(both, f) - getattr(a, f)).abs().max().item() for f in ("a_ci", "a_ii", "o_ii")) for a in alone]
    assert min(diffs) < 1e-5 and max(diffs) > 1e-3, diffs  # one of them, and the two differ
    # cond and uncond in two threads (the usual multi-GPU split) record what one batched call does
    torch.testing.assert_close(maps_of(env.pos, threads=True).a_ii, alone[0].a_ii, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ errors users see
def test_clear_errors(env):
    model = load_model(env)
    cs = concepts(env)
    not_sd3 = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    with refused("needs a model of a supported family, but the connected MODEL is SimpleNamespace \\(Linear\\)"):
        record(env, not_sd3, cs)
    with refused("No concepts given"):
        concepts(env, " , \n ")
    with refused("'<\\|endoftext\\|>' tokenises to nothing"):
        concepts(env, "cat, <|endoftext|>")
    with refused("at most 32"):
        concepts(env, ", ".join(f"thing{i}" for i in range(33)))
    with refused(r"too long for one CLIP window \(75 tokens\): 12 concepts given, 109 tokens with the separators\. Use fewer"):
        concepts(env, ", ".join(f"a very long winded concept number {i}" for i in range(12)))
    with refused(r"too long for one CLIP window \(75 tokens\): 1 concept given, 80 tokens with the separators\."):
        concepts(env, " ".join(["cat"] * 80))
    with refused(r"listed twice \(case is ignored\): cat\.$"):
        concepts(env, "cat, dog, cat")
    with refused(r"listed twice \(case is ignored\): Cat\.$"):
        concepts(env, "cat, dog, Cat")
    with refused("out of range: this .* has 2 joint blocks"):
        record(env, model, cs, graph_layers="0, 5")
    with refused("seg4diff_layer 9 out of range"):
        record(env, model, cs, seg4diff_layer=9)
    with refused("not the text encoder of a supported family"):
        run(env, "AnchorDiffConcepts", types.SimpleNamespace(tokenize=lambda text: {"l": [[(1, 1.0)]]}), "cat")

    patched, recorder = record(env, model, cs)
    maps = read_maps(env, recorder, sample(env, patched))
    other = read_maps(env, recorder, sample(env, patched, seed=9))
    anchors = run(env, "AnchorDiffAnchorSelect", maps, 1, 8.0, 0.5, "", False)[0]
    graph = run(env, "AnchorDiffBuildGatedGraph", other, 98.0, "", True)[0]
    with refused("different recordings"):
        run(env, "AnchorDiffPropagate", graph, anchors, 10)
    with refused("layers \\[5\\] out of range: the recorded model has 2 joint blocks"):
        run(env, "AnchorDiffBuildGatedGraph", maps, 98.0, "0, 1, 5", True)
    deeper, deeper_recorder = record(env, load_model(env, "tiny_sd35m"), cs)  # 3 blocks, records 1 and 2
    deeper_maps = read_maps(env, deeper_recorder, sample(env, deeper))
    with refused("graph layer\\(s\\) \\[0\\] were not recorded; the recording has \\[1, 2\\]"):
        run(env, "AnchorDiffBuildGatedGraph", deeper_maps, 98.0, "0", True)
    with refused("unknown concept 'bird'"):
        run(env, "AnchorDiffAnchorSelect", maps, 1, 8.0, 0.5, "bird: 3, 4", False)
    with refused("outside the 256x256 image"):
        run(env, "AnchorDiffAnchorSelect", maps, 1, 8.0, 0.5, "cat: 300, 4", False)
    heat = run(env, "AnchorDiffPropagate", run(env, "AnchorDiffBuildGatedGraph", maps, 98.0, "", True)[0], anchors, 10)[0]
    with refused("Unknown concept 'bird'"):
        run(env, "AnchorDiffMask", heat, "bird", "mean", 0.5)
    with refused("does not match the 1 recorded image"):
        run(env, "AnchorDiffMask", heat, "", "mean", 0.5, torch.zeros(3, 64, 64, 3))
    with refused("mixes images from different sampling runs"):
        mixed = torch.cat([sample(env, patched, seed=21)["samples"], sample(env, patched, seed=22)["samples"]])
        read_maps(env, recorder, {"samples": mixed})


# ------------------------------------------------------------------ the chain, executed by ComfyUI
def chain_prompt(seed):
    return node_chain.chain_prompt(seed, unet="tiny_sd3.safetensors", clip={"class_type": "AnchorDiffTestCLIP", "inputs": {"t5": False}},
                                   caption="a cat next to a dog", concepts="cat, dog", size=256, cfg=3.0)


def test_whole_chain_runs_in_comfyuis_executor_and_follows_the_seed(env):
    runner = node_chain.executor()

    def masks(seed):
        return node_chain.run_chain(runner, chain_prompt(seed), f"p{seed}")

    first = masks(1)
    assert first.shape == (2, 256, 256) and first.dtype == torch.float32
    assert set(first.unique().tolist()) <= {0.0, 1.0} and 0 < first.mean() < 1
    assert not torch.equal(first[0], first[1])  # one mask per concept
    second = masks(2)  # ComfyUI re-runs the sampler; the cached recorder must serve the new run
    assert not torch.equal(first, second)
    assert torch.equal(masks(1), first)  # and the first seed again gives the first masks


# ------------------------------------------------------------------ precision "auto" (the default)
def test_auto_precision_is_exact_on_a_cpu_and_fast_where_an_accelerator_has_room(env, monkeypatch):
    model_patch = sys.modules[env.pack.__name__ + ".nodes.model_patch"]
    model, cs = load_model(env), concepts(env)
    patched, recorder = record(env, model, cs)  # the node's default precision
    maps = read_maps(env, recorder, sample(env, patched, steps=2))
    assert maps.meta["precision"] == "exact" and maps.o_ii.device.type == "cpu"
    real, seen = model_patch.resolve_precision, []

    def as_on_a_gpu(precision, device, need, free):  # the same rule, told the call runs on an accelerator
        seen.append(need)
        room = 4 * need if len(seen) == 1 else 4 * need - 1  # maps within a quarter of free memory, then just over
        return real(precision, "cuda", need, room)

    monkeypatch.setattr(model_patch, "resolve_precision", as_on_a_gpu)
    for expected in ("fast", "exact"):
        patched, recorder = record(env, model, cs)
        got = read_maps(env, recorder, sample(env, patched, steps=2))
        assert got.meta["precision"] == expected
        if expected == "fast":  # what fast computes differently: O_II through SDPA
            assert not torch.equal(got.o_ii, maps.o_ii)
            torch.testing.assert_close(got.o_ii, maps.o_ii, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(got.o_ii, maps.o_ii)
    n, width, layers = maps.num_tokens, maps.o_ii.shape[-1], len(maps.graph_layers)
    assert seen == [layers * (n * n * 4 + n * width * 4)] * 2  # A_II float32, O_II in the CPU's float32 compute


# ------------------------------------------------------------------ half-precision models
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_records_float32_maps_and_keeps_the_image(env, dtype):
    import comfy.sd

    path = env.models / "diffusion_models" / "tiny_sd3.safetensors"
    half = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})
    half.model.manual_cast_dtype = None  # compute in `dtype` as a GPU would (CPU otherwise upcasts)
    reference = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})  # same weights, fp32 math
    cs = concepts(env)
    maps = {}
    for name, model in (("half", half), ("fp32", reference)):
        patched, recorder = record(env, model, cs, record_step=0)
        out_p = sample(env, patched, seed=8, steps=2)
        torch.testing.assert_close(out_p["samples"], sample(env, model, seed=8, steps=2)["samples"], atol=0, rtol=0)
        maps[name] = read_maps(env, recorder, out_p)
    for field in ("a_ci", "a_ii", "o_ii", "ca_scores", "seg4diff"):
        got, want = getattr(maps["half"], field), getattr(maps["fp32"], field)
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), field
        assert (got - want).norm() / want.norm() < 0.05, field  # half-precision activations, same maps


def test_image_to_concept_maps_come_from_the_models_own_attention_normaliser(env, monkeypatch):
    """The consensus anchor's per-block image-to-concept maps: on every block that is not a graph layer
    the patch runs the joint attention through the fused kernel that also returns its log-sum-exp
    (checked bit-identical to ComfyUI's attention call first) instead of recomputing q k^T. The maps
    equal the recomputed ones, the image equals a plain run's, and an attention function that is not
    that kernel is left running (the recorder recomputes)."""
    import comfy.sample

    model_patch = sys.modules[env.pack.__name__ + ".nodes.model_patch"]
    model = load_model(env)
    cs = concepts(env, "cat, red car")
    calls = []
    real_call = model_patch._JointAttentionLSE.__call__

    def spy(self, func, args, kwargs):
        out, lse = real_call(self, func, args, kwargs)
        calls.append(lse is not None)
        return out, lse

    def recorded():
        patched, recorder = record(env, model, cs, record_step=1, graph_layers="1", seg4diff_layer=0)
        out = sample(env, patched, seed=5, steps=3)
        return read_maps(env, recorder, out), out

    monkeypatch.setattr(model_patch._JointAttentionLSE, "__call__", spy)
    maps, out = recorded()
    depth = maps.num_blocks
    assert calls == [True] * (depth - 1), "every block but the graph layer read the model's normaliser"
    assert torch.equal(out["samples"], sample(env, model, seed=5, steps=3)["samples"])
    # the same maps recomputed: the kernel turned off
    calls.clear()
    monkeypatch.setattr(model_patch, "attention_with_lse", lambda q, k, v: None)
    again, out2 = recorded()
    assert calls == [False] * (depth - 1)
    assert torch.equal(out2["samples"], out["samples"])
    torch.testing.assert_close(maps.ic, again.ic, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps.seg4diff, again.seg4diff, atol=1e-6, rtol=1e-5)
    assert (maps.ic[0, 0] - maps.ic[0, depth - 1]).abs().max() > 1e-3  # not one block's map everywhere


def test_an_attention_function_other_than_the_fused_kernel_is_left_running(env):
    """_JointAttentionLSE compares once: a function whose output is not bit-identical to the fused
    kernel's (here: one rounding step off) keeps producing the model's attention, with no normaliser,
    and the kernel is not tried again for that layout."""
    from anchordiff_core.attention import attention_with_lse as real

    model_patch = sys.modules[env.pack.__name__ + ".nodes.model_patch"]
    q, k, v = (torch.randn(1, 12, 2 * 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    seen = []

    def own(q, k, v, heads, **kw):  # ComfyUI's attention-call convention: [B, L, H*d] in and out
        split = lambda t: t.view(1, -1, heads, 8).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(1, -1, heads * 8)
        seen.append(1)
        return torch.nextafter(out, torch.full_like(out, 2.0)) if kw.get("off") else out

    exact = model_patch._JointAttentionLSE()
    out, lse = exact(own, (q, k, v, 2), {})
    assert lse is not None and torch.equal(out, own(q, k, v, 2))
    out, lse = exact(own, (q, k, v, 2), {})  # now trusted: the kernel alone runs
    assert lse is not None and len(seen) == 2
    other = model_patch._JointAttentionLSE()
    out, lse = other(own, (q, k, v, 2), {"off": True})
    assert lse is None and torch.equal(out, own(q, k, v, 2, off=True))
    tries = []
    model_patch_real = model_patch.attention_with_lse
    try:
        model_patch.attention_with_lse = lambda *a: tries.append(1) or real(*a)
        out, lse = other(own, (q, k, v, 2), {"off": True})
    finally:
        model_patch.attention_with_lse = model_patch_real
    assert lse is None and not tries
    assert other(own, (q, k, v, 2), {"mask": torch.zeros(12, 12)})[1] is None  # a masked call is never taken over
