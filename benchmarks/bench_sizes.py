"""How AnchorDiff's gate and step count should scale with the image size: a grid search on the toy world.

    .venv/bin/python -m benchmarks.bench_sizes        # 128 256 384 512 px x 20 scenes, 1024 px x 6

VALIDATION scenes only (toyworld SPLITS["val"]; the test split is never used for this choice). For
each size, every scene is recorded once through the real ComfyUI capture path (AnchorDiff Look At
Image, toyworld.comfy_run, record_at 0.85) and cached (--cache; the graph inputs A_II / O_II per
recorded graph layer and the paper's anchors). Then, on the cached maps, for every gate (given as
neighbours per token k = (1 - percentile / 100) * N, so that sizes compare) and every step count:

- mIoU: IoU of the mean-threshold mask with the true object, averaged over the phrase concepts
  ("red circle": all its instances);
- look-alike pairs (eq. 14, anchordiff_core.metrics.confusion_pair_metrics, the other object of the
  pair as the confuser): mIoU_fg and NAR.

Anchors: the true object's most central token (upper bound; isolates the graph, as bench_quality's
"true-centre anchor" row) and the paper's (argmax of A_CI over all blocks). Writes sizes.md (the
table) and sizes.json (the whole grid).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as a file, the repository's packages are not importable
    sys.exit("run this from the repository root as a module: python -m benchmarks.bench_sizes")

ROOT = Path(__file__).resolve().parents[1]

from anchordiff_core import build_gated_graph, propagate, soft_map  # noqa: E402
from anchordiff_core.auto import PAPER_GATE_PERCENTILE, PAPER_STEPS, auto_gate_percentile, auto_steps  # noqa: E402
from anchordiff_core.anchors import anchor_seeds  # noqa: E402
from anchordiff_core.metrics import confusion_pair_metrics  # noqa: E402
from anchordiff_core.propagation import minmax_rows  # noqa: E402
from toyworld import SPLITS, make_scene  # noqa: E402
from toyworld.grounding import central_token  # noqa: E402

NEIGHBOURS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 82, 128, 192, 256)
NEIGHBOURS_64x64 = (16, 32, 48, 64, 82, 128, 192, 256)  # 4096 tokens: fewer, to fit the CPU budget
STEPS = (1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 60, 80, 120, 160, 240, 320)
ANCHORS = ("true centre", "paper")


def record(toy, seed: int, size: int, record_at: float, cache: Path | None) -> dict:
    """The graph inputs and paper anchors of one val scene at one size, from the cache or recorded."""
    path = None if cache is None else cache / f"s{size}_r{record_at}_{seed}.pt"
    if path is not None and path.is_file():
        return torch.load(path)
    scene = make_scene(seed, size)
    names = [c.name for c in scene.concepts]
    w0, c0 = time.perf_counter(), time.process_time()
    maps = toy.look(scene.image, scene.caption, names, record_at)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    a_ii, o_ii = maps.graph_inputs(0)
    out = {"a_ii": torch.stack(a_ii).clone(), "o_ii": torch.stack(o_ii).clone(), "grid": maps.grid,
           "paper": maps.a_ci[0].mean(0).argmax(1).clone(), "names": names, "record_s": (wall, cpu)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def heats_at(graph, anchors: torch.Tensor, steps: list[int]) -> dict[int, torch.Tensor]:
    """propagate(graph, anchors, s) for every s in `steps` in one pass (snapshots of the same walk)."""
    state = anchor_seeds(anchors, graph.num_nodes).T.contiguous()
    out, done = {}, 0
    for s in sorted(steps):
        for _ in range(s - done):
            state = graph.transition_t @ state
        done = s
        out[s] = minmax_rows(state.T)
    return out


def scene_scores(rec: dict, scene, gate: float, steps: list[int], check: bool = False) -> dict:
    """anchor -> steps -> metric -> list of values, for one scene at one gate percentile."""
    size = scene.image.shape[0]
    grid = tuple(rec["grid"])
    graph = build_gated_graph(rec["a_ii"], rec["o_ii"], gate_percentile=gate)
    truths = [c.mask for c in scene.concepts]
    phrase = {c.name: k for k, c in enumerate(scene.concepts) if c.level == "phrase"}
    pairs = []
    if scene.kind == "lookalike" and scene.lookalike:
        a, b = (scene.objects[i].phrase for i in scene.lookalike)
        pairs = [(phrase[a], phrase[b]), (phrase[b], phrase[a])]
    anchors = {"true centre": torch.tensor([central_token(t, grid) for t in truths]), "paper": rec["paper"]}
    out = {}
    with torch.no_grad():
        for name, idx in anchors.items():
            per_steps = {}
            heats = heats_at(graph, idx, steps)
            if check:  # the snapshots are exactly what the core's propagate returns
                s = max(steps)
                assert torch.allclose(heats[s], propagate(graph, idx, steps=s), atol=1e-6), "snapshot != propagate"
            for s, raw in heats.items():
                heat = soft_map(raw, grid, (size, size)).numpy()
                m = {"miou": [], "lookalike_miou_fg": [], "lookalike_nar": []}
                for k in phrase.values():
                    pred, truth = heat[k] > heat[k].mean(), truths[k]
                    m["miou"].append(float((pred & truth).sum() / max(1, (pred | truth).sum())))
                for k, o in pairs:
                    r = confusion_pair_metrics(heat[k], truths[k], truths[o])
                    if r is not None:
                        m["lookalike_miou_fg"].append(r["miou_fg"])
                        m["lookalike_nar"].append(r["nar"])
                per_steps[s] = m
            out[name] = per_steps
    return out


def percentile_for(neighbours: float, tokens: int) -> float:
    return 100.0 * (1.0 - neighbours / tokens)


def gates_for(tokens: int, grid: tuple[int, int]) -> dict[str, float]:
    """label -> gate percentile: the neighbour grid (k < N / 2), the paper's 98 and the auto rule's value."""
    ks = NEIGHBOURS_64x64 if tokens >= 4096 else NEIGHBOURS
    gates = {f"k={k}": percentile_for(k, tokens) for k in ks if k <= tokens / 2}
    gates["paper"] = PAPER_GATE_PERCENTILE
    gates["auto"] = auto_gate_percentile(grid)
    return gates


def cached_scores(rec: dict, scene, gate: float, steps: list[int], path: Path | None, check: bool) -> dict:
    """scene_scores, remembered in `path` (a JSON file per scene and size) by gate percentile."""
    key = repr(float(gate))
    store = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    have = store.get(key)
    if have is None or not {str(s) for s in steps} <= set(next(iter(have.values())).keys()):
        store[key] = scene_scores(rec, scene, gate, steps, check)
        if path is not None:
            path.write_text(json.dumps(store))
    return {a: {int(s): per[str(s)] if str(s) in per else per[s] for s in steps} for a, per in store[key].items()}


def run(toy, sizes: list[int], scenes: dict[int, int], record_at: float, cache: Path | None, log=print) -> dict:
    """size -> {grid, tokens, scenes, gates: label -> percentile, scores: anchor -> label -> steps -> metric -> mean}."""
    out = {}
    for size in sizes:
        seeds = list(SPLITS["val"].seeds(scenes[size]))
        acc: dict = {}
        grid = gates = None
        rec_times = []
        w0, c0 = time.perf_counter(), time.process_time()
        for i, seed in enumerate(seeds):
            rec = record(toy, seed, size, record_at, cache)
            rec_times.append(rec["record_s"])
            scene = make_scene(seed, size)
            grid = tuple(rec["grid"])
            tokens = grid[0] * grid[1]
            gates = gates_for(tokens, grid)
            steps = sorted(set(STEPS) | {PAPER_STEPS, auto_steps(grid)})
            scores_file = None if cache is None else cache / f"s{size}_r{record_at}_{seed}.scores.json"
            for label, gate in gates.items():
                r = cached_scores(rec, scene, gate, steps, scores_file, check=(i == 0 and label == "paper"))
                for anchor, per_steps in r.items():
                    for s, m in per_steps.items():
                        for metric, values in m.items():
                            acc.setdefault(anchor, {}).setdefault(label, {}).setdefault(s, {}).setdefault(metric, []).extend(values)
            if log:
                log(f"bench_sizes: {size} px, scene {i + 1}/{len(seeds)}, {time.perf_counter() - w0:.0f} s")
        scores = {a: {g: {s: {m: (float(np.mean(v)) if v else None) for m, v in ms.items()} | {"n": {m: len(v) for m, v in ms.items()}}
                          for s, ms in per.items()} for g, per in by_gate.items()} for a, by_gate in acc.items()}
        rec_arr = np.array(rec_times)
        out[size] = {"grid": grid, "tokens": grid[0] * grid[1], "scenes": len(seeds), "gates": gates, "scores": scores,
                     "record_s_per_scene": {"wall": float(rec_arr[:, 0].mean()), "cpu": float(rec_arr[:, 1].mean())},
                     "search_s": {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}}
    return out


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def best(by_gate: dict, metric: str = "miou") -> tuple[str, int, float]:
    """The (gate label, steps) with the highest mean `metric` over the neighbour grid."""
    cands = [(m[metric], g, int(s)) for g, per in by_gate.items() if g.startswith("k=") for s, m in per.items()
             if m[metric] is not None]
    value, label, steps = max(cands, key=lambda c: (round(c[0], 3), -int(c[2])))  # ties: fewer steps
    return label, steps, value


def _at(per: dict, steps: int) -> dict:
    return per[steps] if steps in per else per[str(steps)]


def summary(r: dict) -> str:
    """The short table (README): paper's fixed values vs auto, per size."""
    lines = ["| image (tokens) | neighbours per token: paper / auto | steps: paper / auto | mIoU, true-centre anchor: paper / auto "
             "| look-alike mIoU_fg (NAR), true-centre: paper / auto | mIoU, paper's anchor: paper / auto |",
             "|---|---|---|---|---|---|"]
    for size, s in r.items():
        grid, n = tuple(s["grid"]), s["tokens"]
        a_steps = auto_steps(grid)
        tc, pa = s["scores"]["true centre"], s["scores"]["paper"]
        p_tc, a_tc = _at(tc["paper"], PAPER_STEPS), _at(tc["auto"], a_steps)
        p_pa, a_pa = _at(pa["paper"], PAPER_STEPS), _at(pa["auto"], a_steps)
        lines.append(f"| {size} px ({grid[0]} x {grid[1]}), {s['scenes']} scenes | {0.02 * n:.1f} / {(1 - s['gates']['auto'] / 100) * n:.1f} "
                     f"| {PAPER_STEPS} / {a_steps} | {_f(p_tc['miou'])} / {_f(a_tc['miou'])} "
                     f"| {_f(p_tc['lookalike_miou_fg'])} ({_f(p_tc['lookalike_nar'])}) / {_f(a_tc['lookalike_miou_fg'])} ({_f(a_tc['lookalike_nar'])}) "
                     f"| {_f(p_pa['miou'])} / {_f(a_pa['miou'])} |")
    return "\n".join(lines)


def markdown(r: dict) -> str:
    lines = [summary(r), ""]
    for anchor in ANCHORS:
        lines += [f"**{anchor} anchor**" + (" (upper bound: isolates the graph)" if anchor == "true centre" else " (argmax of A_CI over all blocks)"),
                  "",
                  "| image | tokens | scenes | paper 98 / 160: k, mIoU, look-alike mIoU_fg, NAR | auto: percentile, steps, k | auto: mIoU, look-alike mIoU_fg, NAR | best on the grid: k, steps, mIoU |",
                  "|---|---|---|---|---|---|---|"]
        for size, s in r.items():
            sc = s["scores"][anchor]
            n = s["tokens"]
            paper = sc["paper"][str(PAPER_STEPS)] if str(PAPER_STEPS) in sc["paper"] else sc["paper"][PAPER_STEPS]
            row = f"| {size} px | {s['grid'][0]} x {s['grid'][1]} | {s['scenes']} | {0.02 * n:.1f}, {_f(paper['miou'])}, {_f(paper['lookalike_miou_fg'])}, {_f(paper['lookalike_nar'])} |"
            if "auto" in sc:
                a_steps = auto_steps(tuple(s["grid"]))
                a = sc["auto"][a_steps] if a_steps in sc["auto"] else sc["auto"][str(a_steps)]
                p = s["gates"]["auto"]
                row += f" {p:.2f}, {a_steps}, {(1 - p / 100) * n:.1f} | {_f(a['miou'])}, {_f(a['lookalike_miou_fg'])}, {_f(a['lookalike_nar'])} |"
            else:
                row += " - | - |"
            label, steps, value = best(sc)
            row += f" {label[2:]}, {steps}, {value:.3f} |"
            lines.append(row)
        lines.append("")
    lines += ["**mIoU (true-centre anchor) by neighbours per token k, at the auto step count** (k = (1 - percentile/100) N; "
              "the paper's 98th percentile is k = 0.02 N)", ""]
    ks = [k for k in NEIGHBOURS]
    lines += ["| image | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for size, s in r.items():
        sc = s["scores"]["true centre"]
        st = auto_steps(tuple(s["grid"])) if "auto" in sc else PAPER_STEPS
        cells = []
        for k in ks:
            per = sc.get(f"k={k}")
            m = None if per is None else (per.get(st) or per.get(str(st)))
            cells.append(_f(m["miou"]) if m else "-")
        lines.append(f"| {size} px | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 384, 512, 1024])
    p.add_argument("--scenes", type=int, default=20, help="val scenes per size")
    p.add_argument("--scenes-at", nargs="*", default=["1024=6"], metavar="SIZE=N",
                   help="fewer scenes at some sizes (default 1024=6: 64 x 64 tokens take ~1 min each to record, ~3 to search)")
    p.add_argument("--record-at", type=float, default=0.85)
    p.add_argument("--cache", default=str(ROOT / ".cache" / "bench_sizes"), help="recorded maps ('' = no cache)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    w0, c0 = time.perf_counter(), time.process_time()
    cache = Path(args.cache) if args.cache else None
    scenes = {s: args.scenes for s in args.sizes}
    for item in args.scenes_at:
        size, _, count = item.partition("=")
        if not (size.isdigit() and count.isdigit()):
            p.error(f"--scenes-at takes SIZE=N items, e.g. 1024=6; got '{item}'")
        if int(size) in scenes:
            scenes[int(size)] = int(count)
    need = [s for s in args.sizes for seed in SPLITS["val"].seeds(scenes[s])
            if cache is None or not (cache / f"s{s}_r{args.record_at}_{seed}.pt").is_file()]
    toy = None
    if need:
        from toyworld.comfy_run import ToyComfy
        toy = ToyComfy()
    r = run(toy, args.sizes, scenes, args.record_at, cache)
    total = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    md = markdown(r)
    foot = (f"\nValidation scenes (toyworld SPLITS['val']), record_at {args.record_at}, maps through AnchorDiff Look At Image in "
            f"ComfyUI. Recording per scene (wall / CPU): " + ", ".join(
                f"{size} px {s['record_s_per_scene']['wall']:.1f} / {s['record_s_per_scene']['cpu']:.1f} s" for size, s in r.items())
            + f". This run: {total['wall_s']:.0f} s wall, {total['cpu_s']:.0f} s CPU (recordings from the cache where present).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sizes.md").write_text(md + "\n" + foot + "\n")
    (out / "sizes.json").write_text(json.dumps({"record_at": args.record_at, "run": total, "sizes": r}, indent=1))
    print(md + "\n" + foot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
