"""Anchor selectors on the toy world (issue 17): anchor accuracy, the mask it leads to, and its cost.

    nice -n 10 .venv/bin/python -m benchmarks.bench_anchors --split test --scenes 60 --record-at 0.85 --json OUT.json

Every scene is recorded once through the real ComfyUI capture path (AnchorDiff Look At Image with
anchor_maps = "all blocks, both directions", so the image-to-concept map of every block is there for
the selectors that use it).  For each selector and each concept (phrases such as "red circle", words):
- anchor accuracy: the anchor token at least half inside the concept's true mask;
- mask IoU at pixel level of AnchorDiff from that anchor (paper settings: 98th-percentile gate,
  160 steps, heat > mean);
- CPU time per concept of the selection alone (after the recording; the graph is built once and
  shared where a selector needs it).
Selectors: the shipped ones (pipeline.ANCHOR_SOURCES: the paper's argmax, the Seg4Diff-layer
image-to-concept argmax, the consensus anchor with and without the per-block image-to-concept maps)
and the label-free candidates that were measured and not shipped (concentration weights, smoothing
over the gated graph, mask verification with the next separated peak; implemented here only).
"Oracle" rows pick one block by its validation score: not label-free, shown for reference.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as a file, the repository's packages are not importable
    sys.exit("run this from the repository root as a module: python -m benchmarks.bench_anchors")

ROOT = Path(__file__).resolve().parents[1]

from anchordiff_core import build_gated_graph, propagate, select_anchors, to_mask  # noqa: E402
from anchordiff_core.anchors import consensus_map, normalize_maps, weighted_map  # noqa: E402
from anchordiff_core.pipeline import anchor_map  # noqa: E402
from toyworld import make_scene  # noqa: E402
from toyworld.cli import scene_parser, scene_seeds  # noqa: E402
from toyworld.grounding import central_token, iou, token_coverage  # noqa: E402

ALL_BLOCKS = "all blocks, both directions (consensus)"


# --- measured candidates that were not shipped -----------------------------------------------------
def concentration(maps: torch.Tensor) -> torch.Tensor:
    """1 - normalised entropy of each map [..., N]: 1 for a one-token map, 0 for a uniform one."""
    p = normalize_maps(maps)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return 1 - entropy / math.log(maps.shape[-1])


def graph_smooth(graph, m: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` rounds of neighbour averaging over the gated graph: m <- W_hat m ([K, N])."""
    w_hat = graph.transition_t.to_dense().T
    for _ in range(steps):
        m = (w_hat @ m.T).T
    return m


def verified_anchors(graph, m: torch.Tensor, grid, candidates: int = 3) -> torch.Tensor:
    """Propagate from each of the `candidates` best separated peaks; keep the one whose mask holds the
    most concept attention inside relative to outside (mean inside / mean outside)."""
    cands = select_anchors(m, candidates, 3.0, 0.3, grid)
    k = m.shape[0]
    p = normalize_maps(m)
    score = torch.full((k, candidates), -math.inf)
    for j in range(candidates):
        ok = cands[:, j] >= 0
        heat = propagate(graph, torch.where(ok, cands[:, j], cands[:, 0]), 160)
        inside = heat > heat.mean(1, keepdim=True)
        ratio = ((p * inside).sum(1) / inside.sum(1).clamp_min(1)) / ((p * ~inside).sum(1) / (~inside).sum(1).clamp_min(1)).clamp_min(1e-12)
        score[:, j] = torch.where(ok, ratio, torch.tensor(-math.inf))
    return cands[torch.arange(k), score.argmax(1)]


def selectors(maps, graph_fn) -> dict:
    """name -> fn() -> anchors [K]."""
    a, ic = maps.a_ci[0], maps.ic[0]
    plain = type(maps)(**{**{f: getattr(maps, f) for f in maps.__dataclass_fields__}, "ic": None})  # as recorded by default
    out = {
        "paper: argmax of A_CI mean": lambda: anchor_map(plain, False, "concept_to_image")[0].argmax(1),
        "argmax of A_CI mean without pre_only block": lambda: anchor_map(plain, True, "concept_to_image")[0].argmax(1),
        "image-to-concept (Seg4Diff layer)": lambda: anchor_map(plain, False, "image_to_concept")[0].argmax(1),
        "consensus, A_CI blocks + Seg4Diff map (default recording; the last block left out)": lambda: anchor_map(plain, False, "consensus")[0].argmax(1),
        "consensus, all blocks both directions (the last left out)": lambda: anchor_map(maps, False, "consensus")[0].argmax(1),
        "consensus smoothed over the token grid (shipped default)": lambda: anchor_map(maps, False, "consensus_smoothed")[0].argmax(1),
        "candidate: consensus including the last block": lambda: consensus_map(a, ic, 2.0).argmax(1),
        # power 1 (the first version; power 2, chosen on validation, is what anchor_map ships)
        "candidate: consensus with power-1 agreement weights": lambda: consensus_map(a[:-1], ic[:-1], 1.0).argmax(1),
        "candidate: A_CI blocks weighted by concentration": lambda: weighted_map(a, concentration(a)).argmax(1),
        "candidate: both directions weighted by concentration": lambda: weighted_map(torch.cat([a, ic]), concentration(torch.cat([a, ic]))).argmax(1),
        "candidate: A_CI mean smoothed over the gated graph (4 steps)": lambda: graph_smooth(graph_fn(), a.mean(0), 4).argmax(1),
        "candidate: consensus smoothed over the gated graph (4 steps)": lambda: graph_smooth(graph_fn(), consensus_map(a[:-1], ic[:-1], 2.0), 4).argmax(1),
        "candidate: A_CI mean, mask-verified among 3 peaks": lambda: verified_anchors(graph_fn(), a.mean(0), maps.grid),
        "candidate: consensus, mask-verified among 3 peaks": lambda: verified_anchors(graph_fn(), consensus_map(a[:-1], ic[:-1], 2.0), maps.grid),
    }
    for layer in range(a.shape[0]):
        out[f"oracle-ish: A_CI block {layer} alone"] = lambda layer=layer: a[layer].argmax(1)
        out[f"oracle-ish: image-to-concept block {layer} alone"] = lambda layer=layer: ic[layer].argmax(1)
    return out


def run(toy, seeds, size: int, record_at: float, log=print) -> dict:
    hits = defaultdict(list)     # (level, selector) -> 0/1
    ious = defaultdict(list)
    cpu = defaultdict(float)
    chance = defaultdict(list)
    concepts = 0
    record = [0.0, 0.0]
    for count, seed in enumerate(seeds):
        scene = make_scene(seed, size)
        names = [c.name for c in scene.concepts]
        w0, c0 = time.perf_counter(), time.process_time()
        maps = toy.look(scene.image, scene.caption, names, record_at, anchor_maps=ALL_BLOCKS)
        record[0] += time.perf_counter() - w0
        record[1] += time.process_time() - c0
        truths = [c.mask for c in scene.concepts]
        inside = np.stack([token_coverage(t, maps.grid) for t in truths]) >= 0.5
        concepts += len(names)
        for k, c in enumerate(scene.concepts):
            chance[c.level].append(float(inside[k].mean()))
        a_ii, o_ii = maps.graph_inputs(0)
        graph = build_gated_graph(a_ii, o_ii, gate_percentile=98.0)
        runs = selectors(maps, lambda: graph)
        runs["true centre (upper bound)"] = lambda: torch.tensor([central_token(t, maps.grid) for t in truths])
        for name, fn in runs.items():
            c0 = time.process_time()
            anchors = fn()
            cpu[name] += time.process_time() - c0
            masks = to_mask(propagate(graph, anchors, 160), maps.grid, (size, size)).numpy() > 0.5
            for k, c in enumerate(scene.concepts):
                hits[(c.level, name)].append(float(inside[k, int(anchors[k])]))
                ious[(c.level, name)].append(iou(masks[k], truths[k]))
        if log and (count + 1) % 10 == 0:
            log(f"bench_anchors: {count + 1} scenes")
    levels = sorted(chance)
    names = list(dict.fromkeys(name for _, name in hits))
    return {
        "scenes": len(list(seeds)), "size": size, "record_at": record_at, "pairs": {lv: len(chance[lv]) for lv in levels},
        "chance": {lv: float(np.mean(chance[lv])) for lv in levels},
        "selectors": {
            name: {
                **{f"anchor accuracy {lv}": float(np.mean(hits[(lv, name)])) for lv in levels},
                **{f"mask IoU {lv}": float(np.mean(ious[(lv, name)])) for lv in levels},
                "cpu ms per concept": 1000 * cpu[name] / concepts,
            }
            for name in names
        },
        "recording (Look At Image, all blocks both directions) s per image": {"wall": record[0] / len(list(seeds)), "cpu": record[1] / len(list(seeds))},
    }


def markdown(r: dict) -> str:
    lines = [f"{r['scenes']} scenes at {r['size']} px, record_at {r['record_at']}; pairs {r['pairs']}; chance "
             + ", ".join(f"{lv} {v:.3f}" for lv, v in r["chance"].items()), "",
             "| selector | anchor acc. phrases | anchor acc. words | mask IoU phrases | mask IoU words | CPU ms / concept |",
             "|---|---|---|---|---|---|"]
    for name, m in r["selectors"].items():
        lines.append(f"| {name} | {m.get('anchor accuracy phrase', float('nan')):.3f} | {m.get('anchor accuracy word', float('nan')):.3f} | "
                     f"{m.get('mask IoU phrase', float('nan')):.3f} | {m.get('mask IoU word', float('nan')):.3f} | {m['cpu ms per concept']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = scene_parser(__doc__.splitlines()[0], scenes=60, record_at=0.85)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    from toyworld.comfy_run import ToyComfy
    w0, c0 = time.perf_counter(), time.process_time()
    r = run(ToyComfy(), scene_seeds(args), args.size, args.record_at)
    r["split"] = args.split
    r["command"] = "python -m benchmarks.bench_anchors " + " ".join(argv if argv is not None else sys.argv[1:])
    r["total"] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    md = markdown(r)
    print(md)
    print(f"total {r['total']['wall_s']:.0f} s wall, {r['total']['cpu_s']:.0f} s CPU")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
