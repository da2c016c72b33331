"""Evaluate saved heat maps against ground-truth masks: ``python -m anchordiff_core.evaluate DIR [--json]``.

Input: a directory of ``.npz`` files, one per image (read in sorted name order, not recursive):

  ``heat``      float array [K, H, W] or [H, W]: the raw response map of each of K concepts (any
                scale; the metrics min-max normalise each map and threshold at its mean).
  ``gt``        bool or 0/1 array of the same shape: the ground-truth mask of each concept.
  ``concepts``  optional string array [K]: the concept names (checked against K, shown in errors).
  ``image``     optional [H, W, 3] (uint8, or floats in 0..1): the image, needed by ``--edges``.

[H, W] arrays are read as K = 1. Maps must already be at the mask resolution (upsample token heat
bilinearly, as ``anchordiff_core.masks.soft_map`` does, to score what the Mask node outputs).

Output:
  * the binary protocol (Acc, mIoU, mAP, and ConceptAttention's "mIoU", which equals Acc/(2-Acc)),
    with every concept of every file scored as foreground against the rest of its image;
  * when any file has K > 1, the multi-concept confusion metrics of AnchorDiff eq. 14 (mIoU_fg, mAP_fg,
    Acc_fg, NAR) over the image-concept pairs of those files.
  * the boundary F-score (``bf``, DAVIS definition; ``--boundary-tolerance`` pixels, default
    ceil(0.008 * diagonal)) of the method's masks, next to mIoU;
  * with ``--edges``: everything again for the image-guided refinement of each map
    (``anchordiff_core.masks.refine_edges``, ``--edge-radius`` px, ``--edge-eps``), so the two rows
    show what the Mask node's edge option changes.
The table prints percentages like the paper; ``--json`` prints values in [0, 1] (NaN as null).
See ``anchordiff_core.metrics`` for the exact definitions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .metrics import BinarySegmentationMeter, MultiConceptMeter, nan_to_none, pct


def load_npz(path: Path, with_image: bool = False):
    """Read one file as heat [K, H, W], gt [K, H, W] and optional concept names (and the image [H, W, 3]
    when `with_image`: then it is required)."""
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("heat", "gt") + (("image",) if with_image else ()) if k not in f.files]
        if missing:
            why = " (--edges needs each file's image)" if "image" in missing else ""
            raise ValueError(f"{path.name}: missing array(s) {missing}{why} (has {f.files})")
        heat, gt = f["heat"], f["gt"]
        names = [str(c) for c in f["concepts"].ravel()] if "concepts" in f.files else None
        image = f["image"] if with_image else None
    if heat.ndim == 2:
        heat = heat[None]
    if gt.ndim == 2:
        gt = gt[None]
    if heat.ndim != 3 or heat.shape != gt.shape:
        raise ValueError(f"{path.name}: heat {heat.shape} and gt {gt.shape} must both be [K,H,W] or [H,W]")
    if names is not None and len(names) != heat.shape[0]:
        raise ValueError(f"{path.name}: {len(names)} concept names for K = {heat.shape[0]} maps")
    if with_image:
        if image.ndim != 3 or image.shape[:2] != heat.shape[1:] or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"{path.name}: image {image.shape} must be [H, W, 3] with the maps' H, W {heat.shape[1:]}")
        return heat, gt, names, image
    return heat, gt, names


class Scores:
    """The two protocols' meters per row (a method, a method + edges, ...): the binary protocol for
    every concept map, AnchorDiff eq. 14 for images with K > 1. The one scoring loop of
    `evaluate_maps` here and of `python -m anchordiff_eval` (anchordiff_eval.run)."""

    def __init__(self, boundary_tolerance: int | None = None):
        self.tolerance = boundary_tolerance
        self.binary: dict[str, BinarySegmentationMeter] = {}
        self.multi: dict[str, MultiConceptMeter] = {}

    def add(self, row: str, maps: np.ndarray, truth: np.ndarray, valid=None) -> list[dict]:
        """maps, truth [K, H, W]; `valid` [H, W]: only these pixels are scored. Returns the binary
        protocol's per-concept values."""
        binary = self.binary.setdefault(row, BinarySegmentationMeter(self.tolerance))
        per = [binary.update(maps[k], truth[k], valid) for k in range(maps.shape[0])]
        if maps.shape[0] > 1:
            self.multi.setdefault(row, MultiConceptMeter()).update(maps, truth)
        return per

    def result(self, row: str) -> dict:
        return {"binary": self.binary[row].compute(),
                "multi_concept": self.multi[row].compute() if row in self.multi else None}

    def results(self) -> dict:
        return {row: self.result(row) for row in self.binary}


def refined(heat: np.ndarray, image: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Pixel maps [K, H, W] -> each min-max normalised (in float64, as the metrics do), then
    ``refine_edges`` guided by the image (``masks.refined_soft_map`` at the maps' own size)."""
    import torch

    from .masks import refined_soft_map

    k, h, w = np.shape(heat)
    rows = torch.from_numpy(np.asarray(heat, dtype=np.float64).reshape(k, h * w))
    return refined_soft_map(rows, (h, w), (h, w), torch.from_numpy(np.ascontiguousarray(image)), radius, eps).numpy()


def evaluate_maps(items, edges: bool = False, edge_radius: int | None = None, edge_eps: float | None = None,
                  boundary_tolerance: int | None = None) -> dict:
    """Both protocols over in-memory images: `items` yields ``(name, heat [K, H, W], gt [K, H, W],
    image [H, W, 3] or None)`` (name is only for error messages). With ``edges`` (every item needs its
    image) everything is scored again for the image-guided refinement of each map, under "edges"."""
    from .masks import EDGE_EPS, EDGE_RADIUS

    radius = EDGE_RADIUS if edge_radius is None else edge_radius
    eps = EDGE_EPS if edge_eps is None else edge_eps
    variants = ["heat"] + (["edges"] if edges else [])
    scores = Scores(boundary_tolerance)
    n_items = 0
    for name, heat, gt, image in items:
        n_items += 1
        try:
            if edges and image is None:
                raise ValueError("edges needs the image")
            for variant in variants:
                scores.add(variant, refined(heat, image, radius, eps) if variant == "edges" else heat, gt)
        except ValueError as e:  # say which file and concept
            raise ValueError(f"{name}: {e}") from None
    if not n_items:
        raise ValueError("no images to evaluate")
    out = {"n_files": n_items}
    for variant in variants:
        res = scores.result(variant)
        if variant == "heat":
            out.update(res)
        else:
            out["edges"] = {"radius": radius, "eps": eps, **res}
    return out


def evaluate_dir(directory, edges: bool = False, edge_radius: int | None = None, edge_eps: float | None = None,
                 boundary_tolerance: int | None = None) -> dict:
    """`evaluate_maps` over every ``.npz`` file in ``directory``; returns the JSON-able results."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    files = sorted(directory.glob("*.npz"))
    if not files:
        raise ValueError(f"no .npz files in {directory}")

    def items():
        for path in files:
            heat, gt, names, *image = load_npz(path, with_image=edges)
            yield f"{path.name}" + (f" (concepts {names})" if names else ""), heat, gt, image[0] if image else None

    return evaluate_maps(items(), edges, edge_radius, edge_eps, boundary_tolerance)


def _pct(v: float) -> str:
    return pct(v, 6)


def format_tables(res: dict) -> str:
    b = res["binary"]
    rows = [("", res)] if "edges" not in res else [
        ("heat (as given)      ", res),
        (f"edges r={res['edges']['radius']} eps={res['edges']['eps']:g} ".ljust(21), res["edges"]),
    ]
    pad = " " * len(rows[0][0])
    lines = [
        f"Binary protocol: {b['n_images']} maps from {res['n_files']} files "
        f"(mAP over {b['n_map_images']}; {b['n_map_skipped']} without foreground skipped). Values in %.",
        f"{pad}     Acc    mIoU     mAP      BF   mIoU(ConceptAttention protocol = Acc/(2-Acc))",
    ]
    for label, r in rows:
        b = r["binary"]
        lines.append(f"{label}  {_pct(b['acc'])}  {_pct(b['miou'])}  {_pct(b['map'])}  {_pct(b['bf'])}   "
                     f"{_pct(b['miou_conceptattention_protocol'])}")
    m = res["multi_concept"]
    if m is not None:
        lines += [
            "",
            f"Multi-concept confusion (AnchorDiff eq. 14): {m['n_pairs']} image-concept pairs from "
            f"{m['n_images']} files with K>1 ({m['n_skipped_pairs']} skipped: empty target mask). Values in %.",
            f"{pad} mIoU_fg  mAP_fg  Acc_fg     NAR",
        ]
        for label, r in rows:
            m = r["multi_concept"]
            lines.append(f"{label}  {_pct(m['miou_fg'])}  {_pct(m['map_fg'])}  {_pct(m['acc_fg'])}  {_pct(m['nar'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anchordiff_core.evaluate",
                                     description="Segmentation metrics over a directory of .npz heat maps.")
    parser.add_argument("directory", help="folder of .npz files (heat, gt, optional concepts)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON, values in [0, 1]")
    parser.add_argument("--edges", action="store_true",
                        help="also score the image-guided edge refinement of every map (each file needs 'image')")
    parser.add_argument("--edge-radius", type=int, default=None, help="refinement window radius in pixels (default 16 = one token)")
    parser.add_argument("--edge-eps", type=float, default=None, help="refinement regularisation (default 1e-3; image in 0..1)")
    parser.add_argument("--boundary-tolerance", type=int, default=None,
                        help="boundary F-score tolerance in pixels (default: ceil(0.008 * image diagonal), as DAVIS)")
    args = parser.parse_args(argv)
    try:
        res = evaluate_dir(args.directory, args.edges, args.edge_radius, args.edge_eps, args.boundary_tolerance)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(nan_to_none(res), indent=2) if args.json else format_tables(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
