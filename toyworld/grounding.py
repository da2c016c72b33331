"""Does the toy SD3's attention ground concepts? Anchor accuracy and AnchorDiff masks on held-out scenes.

    python -m toyworld.grounding --scenes 60 --split test --json toyworld/weights/grounding.json

Every map comes through the real ComfyUI capture path (toyworld.comfy_run: AnchorDiff Look At Image
on the scene's image with its caption as the prompt, noised to record_at). For each concept of each
scene (phrases such as "red circle", words: colours, shapes, the ground):

- anchor accuracy: the anchor token lies inside the concept (at least half of the token's pixels in
  the true mask), for anchors taken from
    ci_all      concept-to-image attention averaged over all blocks (the paper, eq. 5)
    ci_no_last  the same without the pre_only last block (its text queries are never trained)
    ci_<l>      block l alone
    ic_<l>      image-to-concept attention at block l (image queries over [image; prompt; concept]
                keys, read at the concept's columns: the Seg4Diff map of that block)
  chance = the fraction of tokens inside the concept.
- AnchorDiff mask IoU against the truth at pixel level (paper settings: 98th-percentile gate, 160
  steps, mean threshold) for the paper's anchor, the best measured source, a random token (chance)
  and the true object's most central token (an upper bound on anchoring).
"""
from __future__ import annotations

import json
import time
from collections import defaultdict

import numpy as np
import torch

from anchordiff_core.auto import PAPER_GATE_PERCENTILE, PAPER_STEPS

from .world import make_scene


def token_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[N] fraction of each token's pixels inside `mask` (H, W divisible by the grid)."""
    h, w = grid
    H, W = mask.shape
    return mask.reshape(h, H // h, w, W // w).mean((1, 3)).reshape(-1)


def central_token(mask: np.ndarray, grid: tuple[int, int]) -> int:
    """The token deepest inside the mask (largest distance to its edge): an oracle anchor."""
    import cv2
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    h, w = grid
    return int(y * h // mask.shape[0]) * w + int(x * w // mask.shape[1])


def anchor_maps(maps, ic_maps: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Candidate anchor maps [K, N] by source name."""
    a = maps.a_ci[0]  # [L, K, N]
    out = {"ci_all": a.mean(0), "ci_no_last": a[:-1].mean(0)}
    for layer in range(a.shape[0]):
        out[f"ci_{layer}"] = a[layer]
    for layer, m in ic_maps.items():
        out[f"ic_{layer}"] = m
    if ic_maps:
        out["ic_mean"] = torch.stack(list(ic_maps.values())).mean(0)
    return out


def anchordiff_heat(maps, anchors: torch.Tensor, gate: float | None = PAPER_GATE_PERCENTILE, steps: int = PAPER_STEPS) -> torch.Tensor:
    from anchordiff_core import build_gated_graph, propagate
    a_ii, o_ii = maps.graph_inputs(0)
    return propagate(build_gated_graph(a_ii, o_ii, gate_percentile=gate), anchors, steps=steps)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = (pred | truth).sum()
    return float((pred & truth).sum() / union) if union else 1.0


def grounding_accuracy(toy, seeds, size: int = 256, record_at: float = 0.5, per_layer_ic: bool = True, log=print) -> dict:
    from anchordiff_core import to_mask
    rng = np.random.default_rng(0)
    hits: dict[tuple[str, str], list[float]] = defaultdict(list)   # (level, source) -> 0/1
    chance: dict[str, list[float]] = defaultdict(list)
    ious: dict[tuple[str, str], list[float]] = defaultdict(list)
    t0 = time.monotonic()
    depth = None
    for count, seed in enumerate(seeds):
        scene = make_scene(seed, size)
        names = [c.name for c in scene.concepts]
        maps = toy.look(scene.image, scene.caption, names, record_at)
        depth = maps.num_blocks
        ic = {}
        if per_layer_ic:
            for layer in range(depth):
                other = maps if layer == maps.seg4diff_layer else toy.look(scene.image, scene.caption, names, record_at, seg4diff_layer=layer)
                ic[layer] = other.seg4diff[0]
        sources = anchor_maps(maps, ic)
        grid = maps.grid
        truths = [c.mask for c in scene.concepts]
        cover = np.stack([token_coverage(m, grid) for m in truths])   # [K, N]
        inside = cover >= 0.5
        for k, c in enumerate(scene.concepts):
            chance[c.level].append(float(inside[k].mean()))
        for name, amap in sources.items():
            idx = amap.argmax(1).numpy()
            for k, c in enumerate(scene.concepts):
                hits[(c.level, name)].append(float(inside[k, idx[k]]))
        # masks at pixel level
        mask_sources = {
            "paper (ci_all)": sources["ci_all"].argmax(1),
            "ci_no_last": sources["ci_no_last"].argmax(1),
            "random anchor (chance)": torch.from_numpy(rng.integers(0, maps.num_tokens, size=len(names))),
            "true centre (upper bound)": torch.tensor([central_token(m, grid) for m in truths]),
        }
        if "ic_mean" in sources:
            mask_sources["ic_mean"] = sources["ic_mean"].argmax(1)
        for name, anchors in mask_sources.items():
            heat = anchordiff_heat(maps, anchors)
            masks = to_mask(heat, grid, (size, size)).numpy() > 0.5
            for k, c in enumerate(scene.concepts):
                ious[(c.level, name)].append(iou(masks[k], truths[k]))
        if log and (count + 1) % 10 == 0:
            log(f"grounding: {count + 1} scenes, {time.monotonic() - t0:.0f} s")
    levels = sorted(chance)
    result = {
        "scenes": len(list(seeds)), "size": size, "record_at": record_at, "blocks": depth,
        "pairs": {lv: len(chance[lv]) for lv in levels},
        "chance": {lv: float(np.mean(chance[lv])) for lv in levels},
        "anchor_accuracy": {lv: {src: float(np.mean(v)) for (l2, src), v in hits.items() if l2 == lv} for lv in levels},
        "mask_iou": {lv: {src: float(np.mean(v)) for (l2, src), v in ious.items() if l2 == lv} for lv in levels},
        "seconds": time.monotonic() - t0,
    }
    return result


def format_result(r: dict) -> str:
    lines = [f"{r['scenes']} scenes at {r['size']} px, record_at {r['record_at']}, {r['blocks']} blocks; pairs {r['pairs']}"]
    for lv in r["chance"]:
        acc = r["anchor_accuracy"][lv]
        lines.append(f"[{lv}] chance {r['chance'][lv]:.3f}  " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        lines.append(f"[{lv}] mask IoU  " + "  ".join(f"{k} {v:.3f}" for k, v in r["mask_iou"][lv].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    from .cli import scene_parser, scene_seeds

    p = scene_parser(__doc__.splitlines()[0], scenes=60, record_at=0.5)
    p.add_argument("--weights", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--no-per-layer-ic", action="store_true")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    from .comfy_run import WEIGHTS, ToyComfy
    from pathlib import Path
    toy = ToyComfy(Path(args.weights) if args.weights else WEIGHTS)
    r = grounding_accuracy(toy, scene_seeds(args), args.size, args.record_at, not args.no_per_layer_ic)
    print(format_result(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
