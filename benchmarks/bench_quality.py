"""Mask quality on the toy world: AnchorDiff, its ablations and the published baselines, in one run.

    .venv/bin/python benchmarks/bench_quality.py --scenes 40 --split test --out benchmarks/results

Every map comes from the trained toy SD3 through the real ComfyUI capture path (AnchorDiff Look At
Image; toyworld.comfy_run). Metrics (anchordiff_core.metrics):
- look-alike pairs (the same shape in two close colours) and unrelated pairs (different colour and
  shape): AnchorDiff's eq. 14 mIoU_fg, mAP_fg, Acc_fg and NAR for each object's phrase, with the
  other object as the confuser;
- single-object scenes: the binary protocol (Acc, standard fg/bg mIoU, mAP) on the phrase;
- anchor accuracy (anchor token at least half inside the concept), for the anchored methods;
- time per image per method (wall and CPU, after the recording).
Writes quality.md (the table), quality.json and quality.png (scenes, truth, heat and masks).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anchordiff_core import build_gated_graph, propagate, select_anchors, soft_map  # noqa: E402
from anchordiff_core.baselines import concept_attention_heat, cross_attention_heat, seg4diff_heat  # noqa: E402
from anchordiff_core.metrics import BinarySegmentationMeter, confusion_pair_metrics  # noqa: E402
from toyworld import SPLITS, make_scene  # noqa: E402
from toyworld.grounding import central_token, token_coverage  # noqa: E402


def methods(maps, truths, gate=98.0, steps=160):
    """name -> (heat [K, N], anchors [K] or None). Times are measured by the caller per method."""
    a = maps.a_ci[0]
    graph_layers = maps.graph_layers
    a_ii, o_ii = maps.graph_inputs(0)
    graph = build_gated_graph(a_ii, o_ii, gate_percentile=gate)
    paper = a.mean(0).argmax(1)
    out = {}

    def anchordiff(name, anchors, g=graph):
        out[name] = lambda: (propagate(g, anchors, steps=steps), anchors)

    anchordiff("AnchorDiff (paper)", paper)
    anchordiff("AnchorDiff, anchors without pre_only block", a[:-1].mean(0).argmax(1))
    out["AnchorDiff, no gate"] = lambda: (propagate(build_gated_graph(a_ii, o_ii, gate_percentile=None), paper, steps=steps), paper)
    if len(graph_layers) > 1:
        for layer in graph_layers:
            def single(layer=layer):
                ai, oi = maps.graph_inputs(0, [layer])
                return propagate(build_gated_graph(ai, oi, gate_percentile=gate), paper, steps=steps), paper
            out[f"AnchorDiff, graph layer {layer} only"] = single
    if maps.seg4diff is not None:
        anchordiff("AnchorDiff, image-to-concept anchor", maps.seg4diff[0].argmax(1))
    anchordiff("AnchorDiff, true-centre anchor (upper bound)", torch.tensor([central_token(t, maps.grid) for t in truths]))
    out["AnchorDiff, multi-anchor (3)"] = lambda: (
        propagate(graph, select_anchors(a.mean(0), 3, 4.0, 0.5, maps.grid), steps=steps), None)
    out["Cross-attention (A_CI alone)"] = lambda: (cross_attention_heat(a), None)
    out["ConceptAttention"] = lambda: (concept_attention_heat(maps.ca_scores[0]), None)
    if maps.seg4diff is not None:
        out["Seg4Diff"] = lambda: (seg4diff_heat(maps.seg4diff[0]), None)
    return out


def run(toy, seeds, size: int, record_at: float, log=print) -> dict:
    pairs = defaultdict(lambda: defaultdict(list))   # (group, method) -> metric -> values
    binary = defaultdict(BinarySegmentationMeter)
    anchor_hits = defaultdict(list)
    times = defaultdict(lambda: [0.0, 0.0])
    record_times = []
    figure_rows = []
    n = 0
    for seed in seeds:
        scene = make_scene(seed, size)
        names = [c.name for c in scene.concepts]
        truths = [c.mask for c in scene.concepts]
        w0, c0 = time.perf_counter(), time.process_time()
        maps = toy.look(scene.image, scene.caption, names, record_at)
        record_times.append((time.perf_counter() - w0, time.process_time() - c0))
        cover = np.stack([token_coverage(t, maps.grid) for t in truths]) >= 0.5
        heats = {}
        for name, fn in methods(maps, truths).items():
            w0, c0 = time.perf_counter(), time.process_time()
            heat, anchors = fn()
            times[name][0] += time.perf_counter() - w0
            times[name][1] += time.process_time() - c0
            heats[name] = soft_map(heat, maps.grid, (size, size)).numpy()
            if anchors is not None:
                idx = anchors.numpy()
                anchor_hits[name].extend(cover[np.arange(len(names)), idx].tolist())
        phrase = {c.name: k for k, c in enumerate(scene.concepts) if c.level == "phrase"}
        objs = scene.objects
        groups = []
        if scene.kind == "lookalike" and scene.lookalike:
            a_i, b_i = scene.lookalike
            groups.append(("look-alike pairs", objs[a_i].phrase, objs[b_i].phrase))
            groups.append(("look-alike pairs", objs[b_i].phrase, objs[a_i].phrase))
        for i in range(len(objs)):
            for j in range(len(objs)):
                if i != j and objs[i].shape != objs[j].shape and objs[i].colour != objs[j].colour:
                    groups.append(("unrelated pairs", objs[i].phrase, objs[j].phrase))
                    break
        for method, hm in heats.items():
            for group, target, other in groups:
                k, o = phrase[target], phrase[other]
                m = confusion_pair_metrics(hm[k], truths[k], truths[o])
                if m is not None:
                    for key in ("miou_fg", "map_fg", "acc_fg", "nar"):
                        pairs[(group, method)][key].append(m[key])
            if len(objs) == 1:
                k = phrase[objs[0].phrase]
                binary[method].update(hm[k], truths[k])
        if len(figure_rows) < 3 and scene.kind == "lookalike":
            k = phrase[objs[scene.lookalike[0]].phrase]
            figure_rows.append((scene, k, {m: h[k] for m, h in heats.items()}))
        n += 1
        if log and n % 10 == 0:
            log(f"bench_quality: {n} scenes")
    table = {}
    for (group, method), vals in pairs.items():
        table.setdefault(method, {})[group] = {k: float(np.mean(v)) for k, v in vals.items()} | {"n": len(vals["nar"])}
    for method, meter in binary.items():
        if meter.n_images:
            table.setdefault(method, {})["single object"] = meter.compute()
    for method, hits in anchor_hits.items():
        table.setdefault(method, {})["anchor accuracy"] = float(np.mean(hits))
    for method, (wall, cpu) in times.items():
        table.setdefault(method, {})["ms per image"] = {"wall": 1000 * wall / n, "cpu": 1000 * cpu / n}
    rec = np.array(record_times)
    return {"scenes": n, "size": size, "record_at": record_at, "methods": table,
            "recording_ms": {"wall": float(1000 * rec[:, 0].mean()), "cpu": float(1000 * rec[:, 1].mean())},
            "_figure": figure_rows}


def markdown(r: dict) -> str:
    head = ("| method | look-alike mIoU_fg | mAP_fg | NAR | unrelated mIoU_fg | NAR | single-object mIoU | mAP | anchor acc. | ms/image (wall / CPU) |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    f = lambda v: "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"
    for method, m in r["methods"].items():
        la, un, so = m.get("look-alike pairs", {}), m.get("unrelated pairs", {}), m.get("single object", {})
        t = m.get("ms per image", {})
        rows.append(f"| {method} | {f(la.get('miou_fg'))} | {f(la.get('map_fg'))} | {f(la.get('nar'))} | {f(un.get('miou_fg'))} | "
                    f"{f(un.get('nar'))} | {f(so.get('miou'))} | {f(so.get('map'))} | {f(m.get('anchor accuracy'))} | "
                    f"{t.get('wall', 0):.1f} / {t.get('cpu', 0):.1f} |")
    n_la = next((m["look-alike pairs"]["n"] for m in r["methods"].values() if "look-alike pairs" in m), 0)
    n_un = next((m["unrelated pairs"]["n"] for m in r["methods"].values() if "unrelated pairs" in m), 0)
    foot = (f"\n{r['scenes']} held-out scenes at {r['size']} px, record_at {r['record_at']}; {n_la} look-alike and {n_un} "
            f"unrelated target/confuser pairs. Recording (Look At Image, one forward): {r['recording_ms']['wall']:.0f} ms wall, "
            f"{r['recording_ms']['cpu']:.0f} ms CPU per image.")
    return head + "\n" + "\n".join(rows) + foot


def figure(r: dict, path: Path, show=("AnchorDiff (paper)", "AnchorDiff, image-to-concept anchor",
                                       "AnchorDiff, true-centre anchor (upper bound)", "Cross-attention (A_CI alone)",
                                       "ConceptAttention", "Seg4Diff")) -> None:
    from PIL import Image, ImageDraw
    rows = r["_figure"]
    tile = 150
    cols = 2 + len(show)
    img = Image.new("RGB", (cols * (tile + 4) + 4, len(rows) * (tile + 34) + 4), (24, 24, 28))
    d = ImageDraw.Draw(img)
    for i, (scene, k, heats) in enumerate(rows):
        y = 4 + i * (tile + 34)
        truth = scene.image.copy()
        truth[scene.concepts[k].mask] = (0.4 * truth[scene.concepts[k].mask] + [150, 255, 150]).clip(0, 255)
        tiles = [(scene.image, scene.concepts[k].name), (truth, "truth")]
        for m in show:
            if m not in heats:
                continue
            h = heats[m]
            h = (h - h.min()) / (h.max() - h.min() + 1e-12)
            over = scene.image.astype(float) * 0.35
            over[..., 0] += 165 * h
            over[h > h.mean()] += [0, 60, 0]
            tiles.append((over.clip(0, 255).astype(np.uint8), m.replace("AnchorDiff, ", "").replace(" (upper bound)", "")))
        for j, (a, label) in enumerate(tiles):
            img.paste(Image.fromarray(a).resize((tile, tile)), (4 + j * (tile + 4), y))
            d.text((4 + j * (tile + 4), y + tile + 3), label[:24], fill=(220, 220, 220))
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=40)
    p.add_argument("--split", default="test", choices=sorted(SPLITS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--record-at", type=float, default=0.5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    from toyworld.comfy_run import ToyComfy
    toy = ToyComfy()
    r = run(toy, SPLITS[args.split].seeds(args.scenes), args.size, args.record_at)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure(r, out / "quality.png")
    md = markdown(r)
    (out / "quality.md").write_text(md + "\n")
    (out / "quality.json").write_text(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
