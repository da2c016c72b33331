"""Mask quality on the toy world: AnchorDiff, its ablations and the published baselines, in one run.

    nice -n 10 .venv/bin/python -m benchmarks.bench_quality --scenes 110 --split test --record-at 0.85

Every map comes from the trained toy SD3, recorded twice per scene from the same latent, noise, sigma and
conditioning: through the real ComfyUI capture path (AnchorDiff Look At Image; toyworld.comfy_run), which
feeds every method, and through diffusers' SD3Transformer2DModel holding the same weights
(anchordiff_core.diffusers_sd3; toyworld.to_diffusers), which feeds the "diffusers capture" row and the
agreement check. Metrics (anchordiff_core.metrics):
- look-alike pairs (the same shape in two close colours) and unrelated pairs (different colour and
  shape): AnchorDiff's eq. 14 mIoU_fg, mAP_fg, Acc_fg and NAR for each object's phrase, with the
  other object as the confuser;
- single-object scenes: the binary protocol (Acc, standard fg/bg mIoU, mAP) on the phrase;
- anchor accuracy (anchor token at least half inside the concept), for the anchored methods;
- edge refinement (masks.refine_edges): the binary protocol's mIoU and the DAVIS boundary F-score of every
  phrase at image resolution, with and without the image-guided refinement (its default radius and eps);
- time per image per method (wall and CPU, after the recording: graph, propagation, anchors).
Writes quality.md (the tables), quality.json and quality.png (scenes, truth, heat and masks).
"""
from __future__ import annotations

import json
from dataclasses import replace
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as a file, the repository's packages are not importable
    sys.exit("run this from the repository root as a module: python -m benchmarks.bench_quality")

ROOT = Path(__file__).resolve().parents[1]

from anchordiff_core import build_gated_graph, propagate, select_anchors, soft_map  # noqa: E402
from anchordiff_core.auto import PAPER_GATE_PERCENTILE, PAPER_STEPS, auto_gate_percentile, auto_min_distance, auto_steps  # noqa: E402
from anchordiff_core.anchors import REGION_MAX_ANCHORS, REGION_MIN_RELATIVE_SCORE  # noqa: E402
from anchordiff_core.propagation import anchor_regions  # noqa: E402
from anchordiff_core.masks import refine_edges  # noqa: E402
from anchordiff_core.pipeline import anchor_map  # noqa: E402
from anchordiff_core.methods import ANCHORDIFF, BASELINES, METHODS  # noqa: E402
from anchordiff_core.metrics import BinarySegmentationMeter, boundary_tolerance, confusion_pair_metrics, mean_threshold  # noqa: E402
from toyworld import make_scene  # noqa: E402
from toyworld.cli import scene_parser, scene_seeds  # noqa: E402
from toyworld.grounding import central_token, token_coverage  # noqa: E402

# Row names: the method registry's titles; the results files, docs/QUALITY.md and the README's summary
# use these names (tests/test_bench_quality.py names them in full)
AD = METHODS[ANCHORDIFF].title
ROW_SUFFIX = {"cross_attention": " (A_CI alone)"}  # the recorder's A_CI, averaged over blocks


def variant(what: str) -> str:
    """The row of AnchorDiff run another way: "AnchorDiff, <what>"."""
    return f"{AD}, {what}"


def baseline_row(key: str) -> str:
    return METHODS[key].title + ROW_SUFFIX.get(key, "")


PAPER = f"{AD} (paper)"
DIFFUSERS = f"{PAPER}, diffusers capture"
PAPER_AUTO = variant("paper's anchor, auto gate and steps")
NO_WCOS = variant("no W_cos (W_attn weights)")
IC_ANCHOR = variant("image-to-concept anchor")
TRUE_CENTRE = variant("true-centre anchor (upper bound)")
CONSENSUS = variant("consensus anchor (all blocks, both directions)")
CONSENSUS_AUTO = CONSENSUS + ", auto gate and steps"  # the nodes' default before the smoothed consensus
SMOOTHED = variant("smoothed consensus anchor (all blocks, both directions)")
SMOOTHED_AUTO = SMOOTHED + ", auto gate and steps"  # the nodes' default before the anchor regions
REGIONS = SMOOTHED_AUTO + ", anchor regions"  # one anchor per concept, Propagate keeping the regions holding it
# Anchor Select's, Propagate's and the recorders' defaults (nodes/stages.py): up to 3 separated peaks of the smoothed
# consensus, Propagate keeping only the mask's regions that hold an anchor
DEFAULT = variant("smoothed consensus, up to 3 anchors, anchor regions, auto gate and steps (the nodes' default)")
REFINED = (PAPER, TRUE_CENTRE)  # the rows measured with and without edge refinement


def methods(maps, truths, gate=PAPER_GATE_PERCENTILE, steps=PAPER_STEPS) -> dict:
    """name -> fn() returning (heat [K, N], anchors [K] or None). Each fn does all the work after the
    recording (graph, propagation, anchors), so the caller's timing of it is the method's cost per image."""
    a = maps.a_ci[0]
    out = {}

    def anchordiff(name, anchors, gate=gate, steps=steps, layers=None, weights="output", regions=False):
        def fn():
            a_ii, o_ii = maps.graph_inputs(0, layers)
            seeds = anchors()
            heat = propagate(build_gated_graph(a_ii, o_ii, gate_percentile=gate, weights=weights), seeds, steps=steps)
            if regions:
                heat = anchor_regions(heat, seeds, maps.grid)
            # anchor accuracy: of the first anchor (the concept's peak)
            return heat, seeds if seeds.dim() == 1 else seeds[:, 0]
        out[name] = fn

    paper = lambda: a.mean(0).argmax(1)  # noqa: E731
    anchordiff(PAPER, paper)
    auto = dict(gate=auto_gate_percentile(maps.grid), steps=auto_steps(maps.grid))  # the nodes' default
    anchordiff(PAPER_AUTO, paper, **auto)
    anchordiff(variant("anchors without pre_only block"), lambda: a[:-1].mean(0).argmax(1))
    anchordiff(variant("no gate"), paper, gate=None)
    anchordiff(NO_WCOS, paper, weights="attention")
    if len(maps.graph_layers) > 1:
        for layer in maps.graph_layers:
            anchordiff(variant(f"graph layer {layer} only"), paper, layers=[layer])
    if maps.seg4diff is not None:
        anchordiff(IC_ANCHOR, lambda: maps.seg4diff[0].argmax(1))
    # the consensus anchor (issue 17): from the default recording (A_CI blocks + the Seg4Diff map), and
    # with every block's image-to-concept map when recorded (--anchor-maps all)
    anchordiff(variant("consensus anchor (A_CI blocks + Seg4Diff map)"),
               lambda: anchor_map(replace(maps, ic=None), False, "consensus")[0].argmax(1))
    if maps.ic is not None:
        anchordiff(CONSENSUS, lambda: anchor_map(maps, False, "consensus")[0].argmax(1))
        anchordiff(CONSENSUS_AUTO, lambda: anchor_map(maps, False, "consensus")[0].argmax(1), **auto)
        anchordiff(SMOOTHED, lambda: anchor_map(maps, False, "consensus_smoothed")[0].argmax(1))
        anchordiff(SMOOTHED_AUTO, lambda: anchor_map(maps, False, "consensus_smoothed")[0].argmax(1), **auto)
        anchordiff(REGIONS, lambda: anchor_map(maps, False, "consensus_smoothed")[0].argmax(1), **auto, regions=True)
        anchordiff(DEFAULT, lambda: select_anchors(anchor_map(maps, False, "consensus_smoothed")[0], REGION_MAX_ANCHORS,
                                                   auto_min_distance(maps.grid), REGION_MIN_RELATIVE_SCORE, maps.grid),
                   **auto, regions=True)
    centre = lambda: torch.tensor([central_token(t, maps.grid) for t in truths])  # noqa: E731
    anchordiff(TRUE_CENTRE, centre)
    anchordiff(variant("true-centre anchor, auto gate and steps"), centre, **auto)
    anchordiff(variant("multi-anchor (3)"), lambda: select_anchors(a.mean(0), 3, 4.0, 0.5, maps.grid))
    for key in BASELINES:  # each over all blocks, ConceptAttention with its softmax over concepts
        m = METHODS[key]
        if m.needs is None or getattr(maps, m.needs) is not None:
            out[baseline_row(key)] = lambda m=m: (m.heat(maps, 0, None, True), None)
    return out


def pair_groups(scene) -> list[tuple[str, str, str]]:
    """(group, target phrase, confuser phrase): both ways round for a look-alike pair, and for each object
    the first object of another shape and colour (an unrelated pair)."""
    objs, groups = scene.objects, []
    if scene.kind == "lookalike" and scene.lookalike:
        a_i, b_i = scene.lookalike
        groups.append(("look-alike pairs", objs[a_i].phrase, objs[b_i].phrase))
        groups.append(("look-alike pairs", objs[b_i].phrase, objs[a_i].phrase))
    for i in range(len(objs)):
        for j in range(len(objs)):
            if i != j and objs[i].shape != objs[j].shape and objs[i].colour != objs[j].colour:
                groups.append(("unrelated pairs", objs[i].phrase, objs[j].phrase))
                break
    return groups


def score_scene(scene, heats: dict, pairs, binary, multi, reached) -> None:
    """Add one scene's image-resolution heats {method: [K, H, W]} to the meters: eq. 14 per pair group,
    the binary protocol on single-object images, and the multi-instance phrases (mIoU, instances reached)."""
    truths = [c.mask for c in scene.concepts]
    phrase = {c.name: k for k, c in enumerate(scene.concepts) if c.level == "phrase"}
    groups = pair_groups(scene)
    for method, hm in heats.items():
        for group, target, other in groups:
            k, o = phrase[target], phrase[other]
            m = confusion_pair_metrics(hm[k], truths[k], truths[o])
            if m is not None:
                for key in ("miou_fg", "map_fg", "acc_fg", "nar"):
                    pairs[(group, method)][key].append(m[key])
        if len(scene.objects) == 1:
            k = phrase[scene.objects[0].phrase]
            binary[method].update(hm[k], truths[k])
        for k, concept in enumerate(scene.concepts):
            if concept.level == "phrase" and len(concept.objects) >= 2:
                multi[method].update(hm[k], truths[k])
                mask = mean_threshold(hm[k])
                for i in concept.objects:
                    visible = scene.object_masks[i]
                    reached[method].append(float(mask[visible].mean() >= 0.25) if visible.any() else 1.0)


def summarise(pairs, binary, multi, reached) -> dict:
    """method -> {group: mean metrics and n, "single object": binary meter, "multi-instance": meter + reached}."""
    table = {}
    for (group, method), vals in pairs.items():
        table.setdefault(method, {})[group] = {k: float(np.mean(v)) for k, v in vals.items()} | {"n": len(vals["nar"])}
    for method, meter in binary.items():
        if meter.n_images:
            table.setdefault(method, {})["single object"] = meter.compute()
    for method, meter in multi.items():
        if meter.n_images:
            table.setdefault(method, {})["multi-instance"] = meter.compute() | {"instances reached": float(np.mean(reached[method]))}
    return table


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - w0, time.process_time() - c0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def run(toy, toyd, seeds, size: int, record_at: float, log=print, with_figure: bool = True, anchor_maps: str | None = None) -> dict:
    """`toy`: toyworld.comfy_run.ToyComfy; `toyd`: toyworld.to_diffusers.ToyDiffusers; `anchor_maps`: Look At
    Image's anchor_maps choice (None: the node's default, every block's maps for the consensus anchor)."""
    pairs = defaultdict(lambda: defaultdict(list))   # (group, method) -> metric -> values
    binary = defaultdict(BinarySegmentationMeter)
    edges = defaultdict(BinarySegmentationMeter)      # (method, refined) -> meter over every phrase
    anchor_hits = defaultdict(list)
    times = defaultdict(lambda: [0.0, 0.0])
    record_times = defaultdict(list)
    same_as_paper = defaultdict(list)                 # method -> per concept: heat equal to the paper's
    agree = defaultdict(list)                         # ComfyUI vs diffusers capture
    mask_area = defaultdict(list)                     # method -> per concept: share of the image in its mask
    multi = defaultdict(BinarySegmentationMeter)      # method -> phrases naming two or more objects
    reached = defaultdict(list)                       # method -> per instance of those: >= 25% of it in the mask
    figure_rows = []
    n = 0
    for seed in seeds:
        scene = make_scene(seed, size)
        names = [c.name for c in scene.concepts]
        truths = [c.mask for c in scene.concepts]
        (cs, latent), w, c = timed(lambda: (toy.concepts(names), toy.latent(scene.image)))
        record_times["encode (Concepts, VAE Encode)"].append((w, c))
        maps, w, c = timed(lambda: toy.look(scene.image, scene.caption, cs, record_at, latent=latent, anchor_maps=anchor_maps))
        record_times["ComfyUI (Look At Image)"].append((w, c))
        dmaps, w, c = timed(lambda: toyd.look(latent["samples"], scene.caption, cs, record_at, maps.graph_layers, maps.seg4diff_layer))
        record_times["diffusers (DiffusersSD3Recorder)"].append((w, c))
        cover = np.stack([token_coverage(t, maps.grid) for t in truths]) >= 0.5
        runs = dict(methods(maps, truths))
        runs[DIFFUSERS] = methods(dmaps, truths)[PAPER]
        heats, token_heat = {}, {}
        for name, fn in runs.items():
            (heat, anchors), w, c = timed(fn)
            times[name][0] += w
            times[name][1] += c
            token_heat[name] = heat
            heats[name] = soft_map(heat, maps.grid, (size, size)).numpy()
            if anchors is not None:
                idx = anchors.numpy()
                anchor_hits[name].extend(cover[np.arange(len(names)), idx].tolist())
        for name, heat in token_heat.items():
            same_as_paper[name].extend(((heat - token_heat[PAPER]).abs().amax(1) < 1e-6).tolist())
            mask_area[name].extend(mean_threshold(h).mean() for h in heats[name])
        # the two capture paths: raw maps, anchors, heat and the method's own masks (heat > mean)
        for field in ("a_ci", "ca_scores", "a_ii", "o_ii", "seg4diff"):
            x, y = getattr(maps, field), getattr(dmaps, field)
            agree[f"{field} max |diff| / max |value|"].append(float((x - y).abs().max() / x.abs().max()))
        agree["paper anchors equal"].append(float(torch.equal(dmaps.a_ci[0].mean(0).argmax(1), maps.a_ci[0].mean(0).argmax(1))))
        agree["paper heat max |diff|"].append(float((token_heat[DIFFUSERS] - token_heat[PAPER]).abs().max()))
        for k in range(len(names)):
            agree["paper mask IoU (per concept)"].append(mask_iou(mean_threshold(heats[PAPER][k]), mean_threshold(heats[DIFFUSERS][k])))
        phrase = {c.name: k for k, c in enumerate(scene.concepts) if c.level == "phrase"}
        image = torch.from_numpy(scene.image)
        for method in REFINED:
            refined = refine_edges(torch.from_numpy(heats[method]), image).numpy()
            for k in phrase.values():
                edges[(method, False)].update(heats[method][k], truths[k])
                edges[(method, True)].update(refined[k], truths[k])
        objs = scene.objects
        score_scene(scene, heats, pairs, binary, multi, reached)
        if with_figure and len(figure_rows) < 3 and scene.kind == "lookalike":
            k = phrase[objs[scene.lookalike[0]].phrase]
            figure_rows.append((scene, k, {m: h[k] for m, h in heats.items()}))
        n += 1
        if log and n % 10 == 0:
            log(f"bench_quality: {n} scenes")
    table = summarise(pairs, binary, multi, reached)
    for method, hits in anchor_hits.items():
        table.setdefault(method, {})["anchor accuracy"] = float(np.mean(hits))
    for method, (wall, cpu) in times.items():
        table.setdefault(method, {})["ms per image"] = {"wall": 1000 * wall / n, "cpu": 1000 * cpu / n}
    for method, same in same_as_paper.items():
        table.setdefault(method, {})["share of concepts with the paper's heat"] = float(np.mean(same))
        table[method]["mask area (share of the image)"] = float(np.mean(mask_area[method]))
    edge = {f"{method}{', refined' if refined else ''}": meter.compute() for (method, refined), meter in edges.items()}
    return {"scenes": n, "size": size, "record_at": record_at, "methods": table, "edges": edge,
            "capture agreement": {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))} for k, v in agree.items()},
            "recording_ms": {k: {"wall": float(1000 * np.mean([t[0] for t in v])), "cpu": float(1000 * np.mean([t[1] for t in v]))}
                             for k, v in record_times.items()},
            "_figure": figure_rows}


def markdown(r: dict) -> str:
    head = ("| method | look-alike mIoU_fg | mAP_fg | Acc_fg | NAR | unrelated mIoU_fg | Acc_fg | NAR | single-object Acc | mIoU | mAP | "
            "multi-instance mIoU | instances reached | anchor acc. | ms/image (wall / CPU) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    f = lambda v: "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"  # noqa: E731
    for method, m in r["methods"].items():
        la, un, so = m.get("look-alike pairs", {}), m.get("unrelated pairs", {}), m.get("single object", {})
        mi, t = m.get("multi-instance", {}), m.get("ms per image", {})
        rows.append(f"| {method} | {f(la.get('miou_fg'))} | {f(la.get('map_fg'))} | {f(la.get('acc_fg'))} | {f(la.get('nar'))} | "
                    f"{f(un.get('miou_fg'))} | {f(un.get('acc_fg'))} | {f(un.get('nar'))} | {f(so.get('acc'))} | {f(so.get('miou'))} | "
                    f"{f(so.get('map'))} | {f(mi.get('miou'))} | {f(mi.get('instances reached'))} | {f(m.get('anchor accuracy'))} | "
                    f"{t.get('wall', 0):.1f} / {t.get('cpu', 0):.1f} |")
    paper = r["methods"][PAPER]
    n_la = paper.get("look-alike pairs", {}).get("n", 0)
    n_un = paper.get("unrelated pairs", {}).get("n", 0)
    n_so = paper.get("single object", {}).get("n_images", 0)
    n_mi = paper.get("multi-instance", {}).get("n_images", 0)
    rec = "; ".join(f"{k} {v['wall']:.0f} ms wall, {v['cpu']:.0f} ms CPU" for k, v in r["recording_ms"].items())
    agree = r["capture agreement"]
    worst_map = max(v["max"] for k, v in agree.items() if k.endswith("/ max |value|"))
    same = {m: v["share of concepts with the paper's heat"] for m, v in r["methods"].items()
            if "graph layer" in m or "W_cos" in m or m == DIFFUSERS}
    foot = (f"\n{r['scenes']} held-out scenes at {r['size']} px, record_at {r['record_at']}: {n_la} look-alike and {n_un} unrelated "
            f"target/confuser pairs, {n_so} single-object images and {n_mi} phrases naming two instances, **{n_la + n_un + n_so + n_mi} image-concept pairs**; "
            f"Acc_fg and NAR as eq. 14; multi-instance: binary mIoU of the two-instance phrases, and the share of their instances with at least "
            f"25% of the instance's pixels in the mask (heat > mean). "
            f"Per image: {rec}.\n\n"
            f"ComfyUI vs diffusers capture: largest map difference {worst_map:.1e} of the map's largest value, paper anchors equal in "
            f"{agree['paper anchors equal']['mean']:.1%} of scenes, heat max |diff| {agree['paper heat max |diff|']['max']:.1e}, "
            f"mask IoU between the two paths mean {agree['paper mask IoU (per concept)']['mean']:.4f}, min "
            f"{agree['paper mask IoU (per concept)']['min']:.4f}.\n\n"
            "Share of concepts whose heat equals the paper row's (|diff| < 1e-6 on every token): "
            + ", ".join(f"{'diffusers capture' if m == DIFFUSERS else m.replace(f'{AD}, ', '')} {v:.1%}" for m, v in same.items()) + ".")
    edge_head = ("\n\n| edge refinement (every phrase, image resolution) | mIoU | IoU_fg | boundary F | mIoU, refined | IoU_fg, refined | boundary F, refined |\n"
                 "|---|---|---|---|---|---|---|")
    edge_rows = []
    for method in REFINED:
        a, b = r["edges"][method], r["edges"][f"{method}, refined"]
        edge_rows.append(f"| {method} | {f(a['miou'])} | {f(a['iou_fg'])} | {f(a['bf'])} | {f(b['miou'])} | {f(b['iou_fg'])} | {f(b['bf'])} |")
    tol = r["edges"][PAPER]
    edge_foot = (f"\n{tol['n_images']} phrase-image pairs; masks = heat > mean after min-max (the binary protocol); boundary F as DAVIS "
                 f"(tolerance ceil(0.008 x diagonal) = {boundary_tolerance((r['size'], r['size']))} px at {r['size']} px); refinement = masks.refine_edges at its defaults "
                 "(guided filter, radius 16 px, eps 1e-3).")
    return head + "\n" + "\n".join(rows) + foot + edge_head + "\n" + "\n".join(edge_rows) + edge_foot


def figure(r: dict, path: Path, show=(PAPER, PAPER_AUTO, DEFAULT, DIFFUSERS, NO_WCOS, IC_ANCHOR, TRUE_CENTRE, *map(baseline_row, BASELINES))) -> None:
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
            label = m.replace(f"{AD}, ", "").replace(" (upper bound)", "").replace(f"{PAPER}, ", "").replace(" (W_attn weights)", "")
            tiles.append((over.clip(0, 255).astype(np.uint8), label))
        for j, (a, label) in enumerate(tiles):
            img.paste(Image.fromarray(a).resize((tile, tile)), (4 + j * (tile + 4), y))
            d.text((4 + j * (tile + 4), y + tile + 3), label[:24], fill=(220, 220, 220))
    img.save(path)


def main(argv=None) -> int:
    p = scene_parser(__doc__.splitlines()[0], scenes=110, record_at=0.85,
                     record_at_help="the toy's recording point, chosen on validation (toyworld/README.md)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--anchor-maps", choices=("paper", "all"), default="all",
                   help="all (Look At Image's default): every block's image-to-concept map too, for the consensus anchor's "
                   "rows, the nodes' default among them; paper: the paper's maps only")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    from toyworld.comfy_run import ToyComfy
    from toyworld.to_diffusers import ToyDiffusers
    w0, c0 = time.perf_counter(), time.process_time()
    anchor_maps = "all blocks, both directions (consensus)" if args.anchor_maps == "all" else "concept→image (paper)"
    r = run(ToyComfy(), ToyDiffusers(), scene_seeds(args), args.size, args.record_at, anchor_maps=anchor_maps)
    r["command"] = "python -m benchmarks.bench_quality " + " ".join(argv if argv is not None else sys.argv[1:])
    r["total"] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure(r, out / "quality.png")
    md = markdown(r) + (f"\n\n`{r['command']}`: {r['total']['wall_s'] / 60:.1f} min wall, {r['total']['cpu_s'] / 60:.1f} min CPU "
                        "(including model loading).")
    (out / "quality.md").write_text(md + "\n")
    (out / "quality.json").write_text(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
