"""The sweep that chose anchors.ANCHOR_SMOOTH_SHARE (issue 17): the consensus anchor map blurred over the
token grid with a Gaussian of `share` x the grid side before its argmax, on the toy's VALIDATION split.

    nice -n 10 .venv/bin/python -m benchmarks.sweep_anchor_smoothing --json benchmarks/results/anchor_smoothing_val.json

For each size and recording point (256 px: 24 scenes, 512 px: 12), every scene is recorded once through
the real ComfyUI capture path (Look At Image, anchor_maps = all blocks, both directions); for each share
and each phrase: anchor accuracy (anchor token at least half inside the phrase's true mask) and the mask
IoU of AnchorDiff from that anchor with the nodes' defaults (auto gate and steps, heat > mean). Rows:
the unsmoothed consensus (share 0), each share (zero outside the grid, as shipped), each share with the
blur normalised at the border, and the true-centre anchor (upper bound). The share
with the best mean mask IoU over the four points is the default.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

if not __package__:  # run as a file, the repository's packages are not importable
    sys.exit("run this from the repository root as a module: python -m benchmarks.sweep_anchor_smoothing")

from anchordiff_core import build_gated_graph, propagate, to_mask  # noqa: E402
from anchordiff_core.anchors import anchor_smooth_sigma, smooth_on_grid  # noqa: E402
from anchordiff_core.auto import auto_gate_percentile, auto_steps  # noqa: E402
from anchordiff_core.pipeline import anchor_map  # noqa: E402
from toyworld import SPLITS, make_scene  # noqa: E402
from toyworld.grounding import central_token, iou, token_coverage  # noqa: E402

SHARES = (0.0, 0.03, 0.045, 0.0625, 0.08, 0.1, 0.125)
POINTS = ((256, 0.85, 24), (256, 0.5, 24), (512, 0.85, 12), (512, 0.5, 12))
ALL_BLOCKS = "all blocks, both directions (consensus)"


def sweep(toy, size: int, record_at: float, scenes: int, split: str = "val") -> dict:
    hits, ious = {}, {}
    for seed in SPLITS[split].seeds(scenes):
        scene = make_scene(seed, size)
        maps = toy.look(scene.image, scene.caption, [c.name for c in scene.concepts], record_at, anchor_maps=ALL_BLOCKS)
        grid = maps.grid
        a_ii, o_ii = maps.graph_inputs(0)
        graph = build_gated_graph(a_ii, o_ii, gate_percentile=auto_gate_percentile(grid))
        consensus = anchor_map(maps, False, "consensus")[0]
        truths = [c.mask for c in scene.concepts]
        inside = np.stack([token_coverage(t, grid) for t in truths]) >= 0.5
        rows = {f"share {s:g}": smooth_on_grid(consensus, grid, anchor_smooth_sigma(grid, s)).argmax(1) for s in SHARES}
        # the same blur divided by the blurred all-ones map (normalised convolution: no pull away from the border;
        # measured, not shipped: the zero-padded blur's mild preference for the interior wins on the toy)
        ones = torch.ones_like(consensus[:1])
        rows.update({f"share {s:g}, normalised at the border": (smooth_on_grid(consensus, grid, anchor_smooth_sigma(grid, s))
                                                              / smooth_on_grid(ones, grid, anchor_smooth_sigma(grid, s))).argmax(1)
                     for s in SHARES if s > 0})
        rows["true centre (upper bound)"] = torch.tensor([central_token(t, grid) for t in truths])
        for name, anchors in rows.items():
            masks = to_mask(propagate(graph, anchors, auto_steps(grid)), grid, (size, size)).numpy() > 0.5
            for k, c in enumerate(scene.concepts):
                if c.level == "phrase":
                    hits.setdefault(name, []).append(float(inside[k, int(anchors[k])]))
                    ious.setdefault(name, []).append(iou(masks[k], truths[k]))
    return {name: {"anchor accuracy": float(np.mean(hits[name])), "mask IoU": float(np.mean(ious[name])), "phrases": len(hits[name])}
            for name in hits}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    from toyworld.comfy_run import ToyComfy
    toy = ToyComfy()
    t0 = time.perf_counter()
    out = {"split": "val", "points": {}}
    for size, record_at, scenes in POINTS:
        out["points"][f"{size} px, record_at {record_at:g}, {scenes} scenes"] = sweep(toy, size, record_at, scenes)
    names = list(next(iter(out["points"].values())))
    out["mean mask IoU over the points"] = {n: float(np.mean([r[n]["mask IoU"] for r in out["points"].values()])) for n in names}
    out["command"] = "python -m benchmarks.sweep_anchor_smoothing " + " ".join(argv if argv is not None else sys.argv[1:])
    out["wall_s"] = time.perf_counter() - t0
    print("| anchor | " + " | ".join(out["points"]) + " | mean IoU |")
    print("|---|" + "---|" * (len(out["points"]) + 1))
    for n in names:
        cells = [f"{r[n]['anchor accuracy']:.3f} / {r[n]['mask IoU']:.3f}" for r in out["points"].values()]
        print(f"| {n} | " + " | ".join(cells) + f" | {out['mean mask IoU over the points'][n]:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
