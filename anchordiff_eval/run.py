"""The evaluation loop: record each image once (resumable cache), score every method, write the
results table and per-image overlays. Recording goes through `comfy.NodeRecorder`; everything else
here is plain numpy / torch from anchordiff_core."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from anchordiff_core.evaluate import Scores
from anchordiff_core.masks import EDGE_EPS, EDGE_RADIUS, refined_soft_map, soft_map
from anchordiff_core.methods import METHODS
from anchordiff_core.metrics import mean_threshold, pct

from .datasets import Sample

CACHE_VERSION = 1
METHOD_TITLES = {key: m.title for key, m in METHODS.items()}


@dataclass(frozen=True)
class Settings:
    """Everything that decides the cached heat maps; a rerun into the same --out must match."""
    model: str
    size: int
    prompt_template: str
    methods: tuple[str, ...]
    record: dict
    cache_version: int = CACHE_VERSION


@dataclass
class DatasetRun:
    key: str  # folder name under --out
    title: str
    samples: Iterable[Sample]
    total: Optional[int] = None
    notes: list[str] = field(default_factory=list)


def prompt_for(sample: Sample, template: str) -> str:
    if sample.prompt:
        return sample.prompt
    return template.format(targets=" and ".join(sample.targets), concepts=", ".join(sample.concepts))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """The paper resizes every image to size x size (aspect ratio not kept); bicubic."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def target_maps(heat: np.ndarray, grid, size: int, truth_hw, image_s: Optional[np.ndarray], edges: bool,
                radius: int, eps: float) -> np.ndarray:
    """Token heat [T, N] -> maps [T, H, W] at the truth's size: bilinear (soft_map, as the Mask node),
    or with `edges` first refined at the model's resolution guided by the image, as the Mask node's
    refine_edges does, then resized to the truth."""
    values = torch.from_numpy(heat).float()
    if not edges:
        return soft_map(values, grid, truth_hw).numpy()
    at_model = refined_soft_map(values, grid, (size, size), torch.from_numpy(image_s), radius, eps)
    return F.interpolate(at_model[:, None], size=tuple(truth_hw), mode="bilinear", align_corners=False)[:, 0].numpy()


# ----------------------------------------------------------------------------- overlays
def _heat_rgb(soft: np.ndarray) -> np.ndarray:
    import cv2

    lo, hi = float(soft.min()), float(soft.max())
    norm = (soft - lo) / (hi - lo) if hi > lo else np.zeros_like(soft)
    return cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]


def _outline(canvas: np.ndarray, mask: np.ndarray, color) -> None:
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, color, 2, cv2.LINE_AA)


def _label(canvas: np.ndarray, text: str) -> None:
    import cv2

    cv2.putText(canvas, text, (5, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(canvas, text, (5, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)


def overlay(sample: Sample, rows: dict[str, np.ndarray], scores: dict[str, list[dict]], panel: int = 256) -> np.ndarray:
    """One row per target: the image with the truth (white outline), then per method its heat over
    the image with its mask (the method's heat > mean, green) and the truth (white) outlined."""
    h, w = sample.image.shape[:2]
    scale = panel / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = lambda a, resample: np.asarray(Image.fromarray(a).resize(size, resample))
    base = small(sample.image, Image.BILINEAR)
    lines = []
    for t, target in enumerate(sample.targets):
        truth = small(sample.masks[t].astype(np.uint8) * 255, Image.NEAREST) > 127
        first = base.copy()
        _outline(first, truth, (255, 255, 255))
        _label(first, target)
        panels = [first]
        for row, maps in rows.items():
            soft = np.asarray(Image.fromarray(maps[t].astype(np.float32)).resize(size, Image.BILINEAR))
            canvas = (0.45 * base + 0.55 * _heat_rgb(soft)).astype(np.uint8)
            _outline(canvas, small(mean_threshold(maps[t]).astype(np.uint8) * 255, Image.NEAREST) > 127, (0, 255, 0))
            _outline(canvas, truth, (255, 255, 255))
            iou = scores[row][t]["iou_fg"]
            _label(canvas, _row_title(row) + ("" if math.isnan(iou) else f" IoU {iou:.2f}"))
            panels.append(canvas)
        lines.append(np.concatenate(panels, axis=1))
    return np.concatenate(lines, axis=0)


# ----------------------------------------------------------------------------- the loop
def evaluate_dataset(dataset: DatasetRun, recorder, settings: Settings, out: Path, *, refine: bool = False,
                     edge_radius: int = EDGE_RADIUS, edge_eps: float = EDGE_EPS, boundary_tolerance: Optional[int] = None,
                     overlays: bool = True, limit: Optional[int] = None, progress: bool = True) -> dict:
    """Record (or read from the cache) and score every sample of `dataset` (with anchordiff_core.evaluate.Scores,
    the scoring of `python -m anchordiff_core.evaluate`); returns its results."""
    from tqdm import tqdm

    cache_dir = out / dataset.key / "cache"
    overlay_dir = out / dataset.key / "overlays"
    cache_dir.mkdir(parents=True, exist_ok=True)
    if overlays:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    scores = Scores(boundary_tolerance)
    n_new = n_cached = 0
    wall = cpu = 0.0
    anchors_inside = anchors_total = 0
    total = dataset.total if limit is None or dataset.total is None else min(limit, dataset.total)
    bar = tqdm(total=total, desc=dataset.title, unit="image", disable=not progress, dynamic_ncols=True)
    seen = set()
    for index, sample in enumerate(dataset.samples):
        if limit is not None and index >= limit:
            break
        if sample.id in seen:
            raise ValueError(f"{dataset.title}: two images have the id '{sample.id}'")
        seen.add(sample.id)
        image_s = resize_square(sample.image, settings.size)
        cached = cache_dir / f"{sample.id}.npz"
        if cached.is_file():
            with np.load(cached, allow_pickle=False) as f:
                if [str(c) for c in f["concepts"]] != list(sample.concepts):
                    raise ValueError(f"{cached} was recorded for concepts {list(f['concepts'])}, not {list(sample.concepts)}: "
                                     "the dataset changed; use another --out or --restart")
                heats = {m: f[f"heat_{m}"] for m in settings.methods}
                grid = tuple(int(v) for v in f["grid"])
                anchors = f["anchors"] if "anchors" in f.files else None
            n_cached += 1
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            values, anchor_tokens, maps = recorder.record(image_s, sample.concepts, prompt_for(sample, settings.prompt_template), settings.methods)
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            n_targets = sample.masks.shape[0]
            heats = {m: v[:n_targets].float().numpy() for m, v in values.items()}
            grid = tuple(maps.grid)
            anchors = None if anchor_tokens is None else anchor_tokens[:n_targets].numpy()
            extra = {} if anchors is None else {"anchors": anchors}
            _atomic_savez(cached, concepts=np.array(sample.concepts), grid=np.array(grid), sigma=np.array(maps.sigma),
                          **{f"heat_{m}": h for m, h in heats.items()}, **extra)
            n_new += 1
        if anchors is not None:  # anchor accuracy: the anchor token's centre inside the target's truth
            gh, gw = grid
            h, w = sample.masks.shape[1:]
            for t, row in enumerate(anchors):
                token = int(row[0])
                if token < 0:
                    continue
                y = min(h - 1, int((token // gw + 0.5) * h / gh))
                x = min(w - 1, int((token % gw + 0.5) * w / gw))
                anchors_inside += bool(sample.masks[t, y, x])
                anchors_total += 1
        rows = {}
        per_row = {}
        for method in settings.methods:
            variants = [(method, False)] + ([(f"{method}+edges", True)] if refine else [])
            for row, edges in variants:
                maps_t = target_maps(heats[method], grid, settings.size, sample.masks.shape[1:], image_s, edges, edge_radius, edge_eps)
                per_row[row] = scores.add(row, maps_t, sample.masks, sample.valid)
                rows[row] = maps_t
        if overlays:
            Image.fromarray(overlay(sample, rows, per_row)).save(overlay_dir / f"{sample.id}.png")
        bar.update(1)
        if "anchordiff" in scores.binary:
            bar.set_postfix(mIoU=f"{100 * scores.binary['anchordiff'].compute()['miou']:.1f}")
    bar.close()
    if not seen:
        raise ValueError(f"{dataset.title}: no images")
    return {
        "title": dataset.title,
        "notes": dataset.notes,
        "n_images": len(seen),
        "n_recorded": n_new,
        "n_from_cache": n_cached,
        "seconds_per_image": {"wall": wall / n_new, "cpu": cpu / n_new} if n_new else None,
        "anchor_inside_truth": anchors_inside / anchors_total if anchors_total else None,
        "boundary_tolerance": boundary_tolerance,
        "edges": {"radius": edge_radius, "eps": edge_eps} if refine else None,
        "methods": scores.results(),
    }


# ----------------------------------------------------------------------------- reporting

def _row_title(row: str) -> str:
    method, _, extra = row.partition("+")
    return METHOD_TITLES.get(method, method) + (" + edges" if extra else "")


def format_markdown(results: dict, settings: Settings) -> str:
    rec = settings.record
    lines = [
        "# AnchorDiff evaluation",
        "",
        f"Model `{settings.model}`; images resized to {settings.size} x {settings.size}; recorded at "
        f"record_at {rec['record_at']} (seed {rec['seed']}); gate percentile {rec['gate_percentile']}, "
        f"{rec['steps']} propagation steps, graph layers {rec['graph_layers'] or 'model default'}; "
        f"prompt template `{settings.prompt_template}`.",
        "",
        "Values in %. **mIoU** = mean of the foreground and background IoU, each accumulated over the "
        "dataset (the standard definition). **mIoU (CA protocol)** = what ConceptAttention's evaluation "
        "code reports as mIoU: intersections and unions summed over both classes before one division, "
        "which equals Acc / (2 - Acc). **BF** = boundary F-score (DAVIS definition). Masks: heat > its "
        "mean, as in the paper.",
    ]
    for key, res in results.items():
        timing = res["seconds_per_image"]
        lines += [
            "",
            f"## {res['title']}",
            "",
            f"{res['n_images']} images ({res['n_recorded']} recorded now, {res['n_from_cache']} from the cache)"
            + (f"; {timing['wall']:.2f} s wall / {timing['cpu']:.2f} s CPU per recorded image (all methods)" if timing else "")
            + (f"; AnchorDiff's anchor inside the target for {pct(res['anchor_inside_truth'])}% of targets"
               if res["anchor_inside_truth"] is not None else "")
            + ".",
        ]
        lines += [f"{note}" for note in res["notes"]]
        lines += [
            "",
            "| method | Acc | mIoU | mIoU (CA protocol) | mAP | BF |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row, r in res["methods"].items():
            b = r["binary"]
            lines.append(f"| {_row_title(row)} | {pct(b['acc'])} | {pct(b['miou'])} | "
                         f"{pct(b['miou_conceptattention_protocol'])} | {pct(b['map'])} | {pct(b['bf'])} |")
        multi = {row: r["multi_concept"] for row, r in res["methods"].items() if r["multi_concept"] is not None}
        if multi:
            n_pairs = next(iter(multi.values()))["n_pairs"]
            lines += [
                "",
                f"Multi-concept confusion (AnchorDiff eq. 14), {n_pairs} image-concept pairs:",
                "",
                "| method | mIoU_fg | mAP_fg | Acc_fg | NAR (lower is better) |",
                "|---|---:|---:|---:|---:|",
            ]
            for row, m in multi.items():
                lines.append(f"| {_row_title(row)} | {pct(m['miou_fg'])} | {pct(m['map_fg'])} | {pct(m['acc_fg'])} | {pct(m['nar'])} |")
    return "\n".join(lines) + "\n"


def check_settings(out: Path, settings: Settings, restart: bool) -> None:
    """Resume only into an --out made with the same settings (else the cache would mix runs)."""
    path = out / "settings.json"
    mine = json.loads(json.dumps(asdict(settings)))
    if path.is_file() and not restart:
        theirs = json.loads(path.read_text())
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"{out} holds results made with other settings ({', '.join(diff)} differ): "
                             "use another --out, or --restart to discard them")
    if restart and out.is_dir():
        import shutil

        for child in out.iterdir():
            if child.is_dir() and (child / "cache").is_dir():
                shutil.rmtree(child)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2) + "\n")
