"""Benchmark: sampling with the recording patch vs without, on this machine.

    python -m benchmarks.bench_capture [--size 1024] [--steps 8] [--depth 2]   # tiny SD3, sampling
    python -m benchmarks.bench_capture --full sd3-medium [--size 1024] [--threads 1] [--repeats 2]
    python -m benchmarks.bench_capture --full sd3.5-large --blocks 4 --graph-layers 1,2 --seg4diff-layer 0
    python -m benchmarks.bench_capture --full flux.1-dev --blocks 2,2 --graph-layers 1,2 --seg4diff-layer 0

--full: SD3 Medium's real shape (ComfyUI's MMDiT, depth 24, hidden 1536, 2.03 B parameters,
random bf16 weights with ComfyUI's float32 manual cast, which is what ComfyUI computes in on a
CPU), built on the spot; one process runs a plain and a recorded forward (one sampler step,
cond only) alternately through the real patch, and reports process CPU time and wall time of
each, and whether the output latent is bit-identical.  --blocks keeps only the first joint blocks
of that shape (ComfyUI's num_blocks: hidden size and heads stay the full model's, the last kept
block is the final pre-only one): SD3.5 Large's 38 blocks (~16 GB in bf16) do not fit a 24 GB
machine beside everything else.  The recorder's own CPU time per block is also measured (around
the patch's per-block recording), so the JSON extrapolates the ratio to the full depth, labelled
as such.

Each mode runs in a fresh subprocess (same model file, seed and settings): a warm-up step, then
the timed sampling.  Peak memory is the growth of the process's peak RSS (CPU) or
torch.cuda.max_memory_allocated (GPU) over its state before sampling; "added by recording" is
the difference between the two modes.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

if not __package__:  # run as a file, the repository's packages are not importable
    sys.exit("run this from the repository root as a module: python -m benchmarks.bench_capture")

from anchordiff_core.anchors import PIXELS_PER_LATENT  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inner(args):
    import torch
    from toyworld import comfy_env
    from tests.fixtures.tiny_sd3 import TinySD3Config, load_with_comfy, save_tiny_sd3

    comfy_env.import_comfy()
    from toyworld.comfy_clip import make_fixture_clip
    assert comfy_env.load_custom_node_pack(ROOT)
    import comfy.model_management
    import comfy.sample
    import nodes

    cfg = TinySD3Config(depth=args.depth)
    path = os.path.join(tempfile.gettempdir(), f"anchordiff_bench_depth{args.depth}.safetensors")
    if not os.path.exists(path):
        save_tiny_sd3(path, cfg)
    model = load_with_comfy(path)
    clip = make_fixture_clip()
    pos = nodes.CLIPTextEncode().encode(clip, "a cat and a dog on a sofa")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    if args.mode == "record":
        concepts = nodes.NODE_CLASS_MAPPINGS["AnchorDiffConcepts"].execute(clip, "cat, dog, sofa, background").args[0]
        model, recorder = nodes.NODE_CLASS_MAPPINGS["AnchorDiffRecordAttention"].execute(
            model, concepts, 0.5, -1, "", -1, 1, **anchor_maps_input(args)).args
    latent = torch.zeros(1, 16, args.size // PIXELS_PER_LATENT, args.size // PIXELS_PER_LATENT)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(steps):
        return comfy.sample.sample(model, noise, steps, 4.0, "euler", "simple", pos, neg, latent, disable_pbar=True, seed=0)

    run(1)  # warm-up: model load, allocator, kernels (records too, when patched: step 0 of 1)
    cuda = comfy.model_management.get_torch_device().type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out = run(args.steps)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - before
    result = {"mode": args.mode, "seconds": seconds, "peak_mb": peak / 2**20, "device": str(comfy.model_management.get_torch_device())}
    if args.mode == "record":
        maps = nodes.NODE_CLASS_MAPPINGS["AnchorDiffReadMaps"].execute(recorder, {"samples": out}).args[0]
        result.update(step=maps.step, tokens=maps.num_tokens, graph_layers=list(maps.graph_layers), held_mb=held_mb(maps))
    print(json.dumps(result))


FULL_SHAPES = {  # ComfyUI unet_config of the real models, and the patch's default layers for them
    "sd3-medium": {"depth": 24, "pos_embed_max_size": 192, "qk_norm": None, "x_block_self_attn_layers": [],
                   "graph_layers": (9, 18), "seg4diff_layer": 9},
    "sd3.5-large": {"depth": 38, "pos_embed_max_size": 192, "qk_norm": "rms", "x_block_self_attn_layers": [],
                    "graph_layers": (23, 31), "seg4diff_layer": 14},
    # Flux.1 dev: 19 double- + 38 single-stream blocks of width 3072 (24 heads x 128); the Flux adapter's
    # default layers (nodes/models/flux.py: SD3 Medium's pair at the same relative depth). --blocks D,S keeps
    # D double and S single blocks. Double and single blocks cost the same per token (226 M multiply-adds).
    "flux.1-dev": {"family": "flux", "depth": 19, "single": 38, "graph_layers": (22, 44), "seg4diff_layer": 22,
                   "text_tokens": 512},
}


ANCHOR_MAPS = {"all": "all blocks, both directions (consensus)", "paper": "concept→image (paper)"}


def anchor_maps_input(args) -> dict:
    """Record Attention's anchor_maps widget: omitted (the node's default) unless --anchor-maps names one."""
    return {} if args.anchor_maps is None else {"anchor_maps": ANCHOR_MAPS[args.anchor_maps]}


def held_mb(maps) -> float:
    """MiB of every map the recording keeps per run (the per-block image-to-concept maps too, when recorded)."""
    kept = (maps.a_ci, maps.ca_scores, maps.a_ii, maps.o_ii, maps.seg4diff, maps.ic)
    return sum(t.numel() * t.element_size() for t in kept if t is not None) / 2**20


def per_block_record_cpu():
    """{block: CPU seconds} spent in the patch's per-block recording (concept stream + maps), by
    timing model_patch._Call._record in this benchmark process."""
    model_patch = next(m for name, m in sys.modules.items() if name.endswith("nodes.model_patch") and hasattr(m, "_Call"))
    spent = {}
    original = model_patch._Call._record

    def timed(self, index, *a, **kw):
        c0 = time.process_time()
        try:
            return original(self, index, *a, **kw)
        finally:
            spent[index] = spent.get(index, 0.0) + time.process_time() - c0

    model_patch._Call._record = timed
    return spent


def extrapolate(result, full_graph_layers, full_seg4diff):
    """The recorded / plain CPU ratio the full-depth model would have, from a depth-reduced run:
    plain cost per block = plain / blocks (the embeddings and final layer, a small share, are
    scaled with the blocks: this slightly overstates the full plain time, so understates the ratio);
    the recorder's cost of a graph block, the Seg4Diff block and the other blocks as measured per
    block; the rest of the recorded run's extra (capture, assembly) kept as measured."""
    blocks, graph = result["blocks"], set(result["graph_layers"])
    seg = result["seg4diff_layer"]
    plain = min(r["cpu_s"] for r in result["plain"])
    best = min(result["record"], key=lambda r: r["cpu_s"])
    per_block = best["recorder_cpu_s_per_block"]
    kind = {i: "graph" if i in graph else "seg4diff" if i == seg else "other" for i in range(blocks)}
    mean = {k: sum(per_block[i] for i in range(blocks) if kind[i] == k) / max(1, sum(v == k for v in kind.values()))
            for k in ("graph", "seg4diff", "other")}
    if mean["seg4diff"] == 0 and seg in graph:
        raise SystemExit("put --seg4diff-layer on a block that is not a graph layer, as in the full model")
    rest = best["cpu_s"] - plain - sum(per_block)
    depth = result["full_depth"]
    full_kinds = {"graph": len(full_graph_layers), "seg4diff": 0 if full_seg4diff in full_graph_layers else 1}
    full_kinds["other"] = depth - sum(full_kinds.values())
    plain_full = plain / blocks * depth
    record_full = plain_full + sum(mean[k] * full_kinds[k] for k in full_kinds) + rest
    return {"plain_cpu_s": plain_full, "record_cpu_s": record_full, "ratio_cpu": record_full / plain_full,
            "recorder_cpu_s_mean_per_block": mean, "rest_cpu_s": rest,
            "how": f"plain CPU per block x {depth}; recorder CPU per graph / Seg4Diff / other block as measured here, "
                   f"x {full_kinds['graph']} / {full_kinds['seg4diff']} / {full_kinds['other']}"}


def full_model(name, blocks=None):
    """A ModelPatcher around ComfyUI's SD3 model of the real shape, random weights (seeded);
    `blocks`: only the first that many joint blocks (same width and heads)."""
    import types

    import torch
    from toyworld import comfy_env
    from tests.fixtures.tiny_sd3 import POOLED_DIM, TEXT_DIM, _init_weights

    comfy_env.import_comfy()
    import comfy.model_patcher
    import comfy.supported_models

    shape = FULL_SHAPES[name]
    hidden = 64 * shape["depth"]
    unet_config = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": shape["depth"], "adm_in_channels": POOLED_DIM,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": TEXT_DIM, "out_features": hidden}},
        "num_patches": shape["pos_embed_max_size"] ** 2, "pos_embed_max_size": shape["pos_embed_max_size"],
        "pos_embed_scaling_factor": None, "qk_norm": shape["qk_norm"], "x_block_self_attn_layers": shape["x_block_self_attn_layers"],
    }
    if blocks is not None:
        if not 2 <= blocks <= shape["depth"]:
            raise SystemExit(f"--blocks must be 2..{shape['depth']} for {name}")
        unet_config["num_blocks"] = blocks
    config = comfy.supported_models.SD3(unet_config)
    config.set_inference_dtype(torch.bfloat16, torch.float32)  # bf16 weights, float32 math (ComfyUI on a CPU)
    model = config.get_model({}, device="cpu")
    cfg = types.SimpleNamespace(seed=0, hidden=hidden, pos_embed_max_size=shape["pos_embed_max_size"], attn_logit_gain=3.0)
    _init_weights(model.diffusion_model, cfg)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def flux_full_model(blocks):
    """A ModelPatcher around ComfyUI's Flux.1-dev of the real width (3072, 24 heads, guidance embedding),
    random weights (tests/fixtures/tiny_flux.py's seeded init), built from a state dict by ComfyUI's own
    loader in bf16 (ComfyUI computes in float32 on a CPU: its manual cast); `blocks` = (double, single)."""
    import torch
    from tests.fixtures.tiny_flux import TinyFluxConfig, build_flux, _bfl_key

    import comfy.sd

    double, single = blocks
    model = build_flux(TinyFluxConfig(hidden=3072, depth=double, single=single))
    sd = {}
    for key, t in model.state_dict().items():  # one tensor at a time: the float32 model and the bf16 copy
        sd[_bfl_key(key)] = t.to(torch.bfloat16)
    del model
    return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.bfloat16})


def full(args):
    import torch

    torch.set_num_threads(args.threads)
    from toyworld import comfy_env

    comfy_env.import_comfy()
    from toyworld.comfy_clip import make_fixture_clip
    assert comfy_env.load_custom_node_pack(ROOT)
    import comfy.sample
    import nodes

    shape = FULL_SHAPES[args.full]
    t0 = time.perf_counter()
    if shape.get("family") == "flux":
        from tests.fixtures.comfy_test_nodes.flux_clip import make_flux_fixture_clip

        double, single = (shape["depth"], shape["single"]) if args.blocks is None else map(int, str(args.blocks).split(","))
        model = flux_full_model((double, single))
        dm = model.model.diffusion_model
        blocks = len(dm.double_blocks) + len(dm.single_blocks)
        clip, text_tokens = make_flux_fixture_clip(), shape["text_tokens"]  # T5-XXL padded to 512, as Flux.1 dev's pipeline
    else:
        model = full_model(args.full, None if args.blocks is None else int(args.blocks))
        blocks = len(model.model.diffusion_model.joint_blocks)
        clip, text_tokens = make_fixture_clip(t5=True), 333  # CLIP 77 + T5 256, as the diffusers SD3 pipeline pads
    built = time.perf_counter() - t0
    record_cpu = per_block_record_cpu()
    pos = nodes.CLIPTextEncode().encode(clip, "a cat and a dog on a sofa")[0]
    text, extra = pos[0]
    pos = [[text.repeat(1, -(-text_tokens // text.shape[1]), 1)[:, :text_tokens], extra]]
    concepts = nodes.NODE_CLASS_MAPPINGS["AnchorDiffConcepts"].execute(clip, "cat, dog, sofa, background").args[0]
    patched, recorder = nodes.NODE_CLASS_MAPPINGS["AnchorDiffRecordAttention"].execute(
        model, concepts, 0.5, 0, args.graph_layers, args.seg4diff_layer, 1, args.precision, **anchor_maps_input(args)).args
    latent = torch.zeros(1, 16, args.size // PIXELS_PER_LATENT, args.size // PIXELS_PER_LATENT)
    noise = comfy.sample.prepare_noise(latent, 0)

    def forward(m):  # one Euler step, cfg 1: exactly one model evaluation of the positive row
        c0, w0 = time.process_time(), time.perf_counter()
        out = comfy.sample.sample(m, noise, 1, 1.0, "euler", "simple", pos, pos, latent, disable_pbar=True, seed=0)
        return out, time.process_time() - c0, time.perf_counter() - w0

    rows = {"plain": [], "record": []}
    outputs = {}
    for _ in range(args.repeats):
        for mode, m in (("plain", model), ("record", patched)):  # alternate, so drift hits both
            record_cpu.clear()
            out, cpu, wall = forward(m)
            rows[mode].append({"cpu_s": cpu, "wall_s": wall})
            if mode == "record":
                rows[mode][-1]["recorder_cpu_s_per_block"] = [record_cpu.get(i, 0.0) for i in range(blocks)]
            outputs[mode] = out
    maps = nodes.NODE_CLASS_MAPPINGS["AnchorDiffReadMaps"].execute(recorder, {"samples": outputs["record"]}).args[0]
    result = {
        "model": args.full, "size": args.size, "threads": args.threads, "precision": args.precision, "build_s": built,
        "tokens": maps.num_tokens, "text_tokens": int(pos[0][0].shape[1]), "graph_layers": list(maps.graph_layers),
        "plain": rows["plain"], "record": rows["record"],
        "identical": bool(torch.equal(outputs["plain"], outputs["record"])),
        "anchor_maps": args.anchor_maps or ("all" if maps.ic is not None else "paper"),  # what was recorded
        "held_mb": held_mb(maps),
    }
    plain_cpu = min(r["cpu_s"] for r in rows["plain"])
    rec_cpu = min(r["cpu_s"] for r in rows["record"])
    result["ratio_cpu"] = rec_cpu / plain_cpu
    result["ratio_wall"] = min(r["wall_s"] for r in rows["record"]) / min(r["wall_s"] for r in rows["plain"])
    result["ratio_cpu_pairs"] = [r["cpu_s"] / p["cpu_s"] for p, r in zip(rows["plain"], rows["record"])]  # each with the plain run before it
    depth = shape["depth"] + shape.get("single", 0)
    result.update(blocks=blocks, full_depth=depth, seg4diff_layer=maps.seg4diff_layer)
    if blocks < depth:
        result["extrapolated"] = extrapolate(result, FULL_SHAPES[args.full]["graph_layers"], FULL_SHAPES[args.full]["seg4diff_layer"])
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", choices=sorted(FULL_SHAPES), default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="exact")
    p.add_argument("--blocks", default=None, help="--full: keep only the first N joint blocks of that shape (Flux: D,S = "
                   "D double- and S single-stream blocks)")
    p.add_argument("--graph-layers", default="", help="--full: Record Attention's graph_layers ('' = the patch's default)")
    p.add_argument("--seg4diff-layer", type=int, default=-1, help="--full: Record Attention's seg4diff_layer (-1 = default)")
    p.add_argument("--json", default=None, help="also write the result here (--full)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mode", default=None)
    p.add_argument("--anchor-maps", choices=sorted(ANCHOR_MAPS), default=None,
                   help="Record Attention's anchor_maps: all (every block's image-to-concept map, the consensus anchor's; "
                   "the node's default) or paper (the paper's maps only); default: the node's default")
    args = p.parse_args()
    if args.full:
        full(args)
        return
    if args.mode:
        inner(args)
        return
    rows = {}
    for repeat in range(args.repeats):
        for mode in ("plain", "record"):  # alternate, so drift on a shared machine hits both
            cmd = [sys.executable, "-m", __spec__.name, "--mode", mode, "--size", str(args.size), "--steps", str(args.steps), "--depth", str(args.depth)]
            cmd += ["--anchor-maps", args.anchor_maps] if args.anchor_maps else []
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            best = rows.get(mode)
            rows[mode] = r if best is None or r["seconds"] < best["seconds"] else {**best, "peak_mb": max(best["peak_mb"], r["peak_mb"])}
    plain, rec = rows["plain"], rows["record"]
    print(f"tiny SD3 (depth {args.depth}) at {args.size}x{args.size} = {rec['tokens']} tokens, {args.steps} steps, cfg 4 (batched cond+uncond), {rec['device']}")
    print(f"  unpatched sampling        {plain['seconds']:.2f} s   peak +{plain['peak_mb']:.0f} MB")
    print(f"  recording step {rec['step']} of {args.steps}  {rec['seconds']:.2f} s   peak +{rec['peak_mb']:.0f} MB")
    print(f"  overhead {100 * (rec['seconds'] / plain['seconds'] - 1):+.1f}%   memory added by recording {rec['peak_mb'] - plain['peak_mb']:+.0f} MB"
          f"   (maps held afterwards: {rec['held_mb']:.0f} MB, graph layers {rec['graph_layers']})")


if __name__ == "__main__":
    main()
