"""Evaluate saved heat maps against ground-truth masks: ``python -m anchordiff_core.evaluate DIR [--json]``.

Input: a directory of ``.npz`` files, one per image (read in sorted name order, not recursive):

  ``heat``      float array [K, H, W] or [H, W]: the raw response map of each of K concepts (any
                scale; the metrics min-max normalise each map and threshold at its mean).
  ``gt``        bool or 0/1 array of the same shape: the ground-truth mask of each concept.
  ``concepts``  optional string array [K]: the concept names (checked against K, shown in errors).

[H, W] arrays are read as K = 1. Maps must already be at the mask resolution.

Output:
  * the binary protocol (Acc, mIoU, mAP, and ConceptAttention's "mIoU", which equals Acc/(2-Acc)),
    with every concept of every file scored as foreground against the rest of its image;
  * when any file has K > 1, the multi-concept confusion metrics of AnchorDiff eq. 14 (mIoU_fg, mAP_fg,
    Acc_fg, NAR) over the image-concept pairs of those files.
The table prints percentages like the paper; ``--json`` prints values in [0, 1] (NaN as null).
See ``anchordiff_core.metrics`` for the exact definitions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from .metrics import BinarySegmentationMeter, MultiConceptMeter


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Read one file as heat [K, H, W], gt [K, H, W] and optional concept names."""
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("heat", "gt") if k not in f.files]
        if missing:
            raise ValueError(f"{path.name}: missing array(s) {missing} (has {f.files})")
        heat, gt = f["heat"], f["gt"]
        names = [str(c) for c in f["concepts"].ravel()] if "concepts" in f.files else None
    if heat.ndim == 2:
        heat = heat[None]
    if gt.ndim == 2:
        gt = gt[None]
    if heat.ndim != 3 or heat.shape != gt.shape:
        raise ValueError(f"{path.name}: heat {heat.shape} and gt {gt.shape} must both be [K,H,W] or [H,W]")
    if names is not None and len(names) != heat.shape[0]:
        raise ValueError(f"{path.name}: {len(names)} concept names for K = {heat.shape[0]} maps")
    return heat, gt, names


def evaluate_dir(directory) -> dict:
    """Run both protocols over every ``.npz`` file in ``directory``; returns the JSON-able results."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    files = sorted(directory.glob("*.npz"))
    if not files:
        raise ValueError(f"no .npz files in {directory}")
    binary, multi = BinarySegmentationMeter(), MultiConceptMeter()
    for path in files:
        heat, gt, names = load_npz(path)
        try:
            for k in range(heat.shape[0]):
                binary.update(heat[k], gt[k])
            if heat.shape[0] > 1:
                multi.update(heat, gt)
        except ValueError as e:  # say which file and concept
            what = f"{path.name}" + (f" (concepts {names})" if names else "")
            raise ValueError(f"{what}: {e}") from None
    return {
        "n_files": len(files),
        "binary": binary.compute(),
        "multi_concept": multi.compute() if multi.n_images else None,
    }


def _pct(v: float) -> str:
    return "   n/a" if v is None or math.isnan(v) else f"{100 * v:6.2f}"


def format_tables(res: dict) -> str:
    b = res["binary"]
    lines = [
        f"Binary protocol: {b['n_images']} maps from {res['n_files']} files "
        f"(mAP over {b['n_map_images']}; {b['n_map_skipped']} without foreground skipped). Values in %.",
        "     Acc    mIoU     mAP   mIoU(ConceptAttention protocol = Acc/(2-Acc))",
        f"  {_pct(b['acc'])}  {_pct(b['miou'])}  {_pct(b['map'])}   {_pct(b['miou_conceptattention_protocol'])}",
    ]
    m = res["multi_concept"]
    if m is not None:
        lines += [
            "",
            f"Multi-concept confusion (AnchorDiff eq. 14): {m['n_pairs']} image-concept pairs from "
            f"{m['n_images']} files with K>1 ({m['n_skipped_pairs']} skipped: empty target mask). Values in %.",
            " mIoU_fg  mAP_fg  Acc_fg     NAR",
            f"  {_pct(m['miou_fg'])}  {_pct(m['map_fg'])}  {_pct(m['acc_fg'])}  {_pct(m['nar'])}",
        ]
    return "\n".join(lines)


def _nan_to_none(d):
    if isinstance(d, dict):
        return {k: _nan_to_none(v) for k, v in d.items()}
    return None if isinstance(d, float) and math.isnan(d) else d


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anchordiff_core.evaluate",
                                     description="Segmentation metrics over a directory of .npz heat maps.")
    parser.add_argument("directory", help="folder of .npz files (heat, gt, optional concepts)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON, values in [0, 1]")
    args = parser.parse_args(argv)
    try:
        res = evaluate_dir(args.directory)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_nan_to_none(res), indent=2) if args.json else format_tables(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
