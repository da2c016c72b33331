"""Segmentation metrics for concept heat maps (pure numpy/torch, no ComfyUI).

Two protocols, following AnchorDiff section 5.1 (values are returned in [0, 1]; the paper prints %).

Binary protocol (ImageNet-Segmentation, PascalVOC single-class), ``BinarySegmentationMeter``:
  * each heat map is min-max normalised per image (a constant map becomes all zeros) and the
    prediction is ``heat > mean(heat)`` (strict, so a constant map predicts nothing);
  * ``acc``: correct pixels / pixels, summed over the dataset;
  * ``miou``: standard two-class mean IoU, ``(IoU_fg + IoU_bg) / 2``, each class's intersections and
    unions summed over the dataset before dividing;
  * ``map``: average precision per image (min-max heat as score, gt as label), averaged over images.
    AP uses scikit-learn's ``average_precision_score`` definition: ``sum_n (R_n - R_{n-1}) P_n`` with
    one threshold per distinct score (tied pixels enter together). An image without any foreground
    pixel has no AP: it is skipped for ``map`` only and counted in ``n_map_skipped``;
  * ``miou_conceptattention_protocol``: the number ConceptAttention's evaluation code reports as
    "mIoU": intersections and unions summed over both classes *and* the dataset before one division.
    Since I_fg + I_bg = correct pixels C and U_fg + U_bg = 2N - C, it equals ``acc / (2 - acc)``
    exactly. It is not a mean IoU; it is reported only to compare with tables that used it.

Multi-concept confusion protocol (AnchorDiff eq. 14), ``MultiConceptMeter``: for every image and
every target concept c (the others are the non-targets):
  * ``M_other = (union of the other concepts' masks) minus M_c``; evaluation region ``R = M_c | M_other``;
  * ``H_c`` is the min-max normalised heat; the binary mask is ``H_c > mean(H_c)`` with the mean over
    the WHOLE image, i.e. the mask the method itself outputs, then looked at inside R only (the
    threshold is not recomputed inside R, which would use the ground truth to pick it);
  * ``acc_fg``: fraction of R pixels classified correctly (on inside M_c, off inside M_other);
  * ``miou_fg``: mean of two IoUs inside R: target class (M_c vs predicted on) and non-target class
    (M_other vs predicted off). ``iou_fg_target`` / ``iou_fg_other`` report the two parts;
  * ``map_fg``: AP of H_c restricted to R with label M_c;
  * ``nar = sum_{M_other} H_c / sum_R H_c``; when H_c is zero on all of R (0/0) no activation reached
    a non-target, so NAR is 0; such pairs are counted in ``n_nar_zero_mass``;
  * every metric is averaged over image-concept pairs. A pair whose target mask is empty cannot be
    scored (no target pixels) and is skipped, counted in ``n_skipped_pairs``.

Boundary F-score (``boundary_f_score``, ``BinarySegmentationMeter``'s ``bf``), as in the DAVIS benchmark
(Perazzi et al. 2016; Martin et al. 2004): the boundary of a mask is its foreground pixels that have a
4-neighbour in the background (the image border is not an edge); a predicted boundary pixel is correct when
a true boundary pixel lies within ``tolerance`` pixels (Euclidean), and the other way round for recall;
``bf = 2 P R / (P + R)``. Default tolerance: DAVIS's ``ceil(0.008 * image diagonal)`` pixels (2 px at
128 x 128, 12 px at 1024 x 1024). No boundary in either mask: P = R = 1; in one only: the empty side's
P (or R) is 1 and the other 0. ``bf`` is averaged over images (masks: the method's ``heat > mean``).

IoU convention everywhere: a class whose union is empty (absent from both truth and prediction) has
IoU NaN and is left out of the mean over classes.

Pixel counts are accumulated as Python integers (exact) and scores as float64 sums.
"""

from __future__ import annotations

import math

import numpy as np

try:  # torch is a package dependency, but the metrics also work on numpy alone
    import torch
except ImportError:  # pragma: no cover
    torch = None

__all__ = [
    "minmax_normalize",
    "mean_threshold",
    "average_precision",
    "boundary_f_score",
    "mask_boundary",
    "confusion_pair_metrics",
    "BinarySegmentationMeter",
    "MultiConceptMeter",
    "nan_to_none",
    "pct",
]


def nan_to_none(d):
    """A results tree (dicts, lists, tuples) with every NaN float as None, for JSON (null, not NaN)."""
    if isinstance(d, dict):
        return {k: nan_to_none(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [nan_to_none(v) for v in d]
    return None if isinstance(d, float) and math.isnan(d) else d


def pct(v, width: int = 0) -> str:
    """A value in [0, 1] as a percentage with 2 decimals ("n/a" for None / NaN), right-aligned in `width`."""
    if v is None or math.isnan(v):
        return "n/a".rjust(width)
    return f"{100 * v:{width}.2f}" if width else f"{100 * v:.2f}"


# ----------------------------------------------------------------------------- input handling

def _to_numpy(x, name: str) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():  # bfloat16 has no numpy dtype
            x = x.to(torch.float64)
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}") from e


def _heat(x, name: str = "heat") -> np.ndarray:
    a = _to_numpy(x, name)
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) or np.iscomplexobj(a):
        raise ValueError(f"{name} must be real-valued, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(a.shape)})")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _mask(x, name: str = "gt") -> np.ndarray:
    a = _to_numpy(x, name)
    if a.dtype != bool:
        if not (np.issubdtype(a.dtype, np.number) and np.isin(a, (0, 1)).all()):
            bad = np.unique(a[~np.isin(a, (0, 1))])[:5] if np.issubdtype(a.dtype, np.number) else a.dtype
            raise ValueError(f"{name} must be binary (bool or 0/1); found values {bad}")
        a = a.astype(bool)
    return a


def _pair(heat, gt, ndim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    h, g = _heat(heat), _mask(gt)
    if h.ndim != ndim or g.ndim != ndim:
        raise ValueError(f"{what}: heat and gt must be {ndim}-D, got shapes {h.shape} and {g.shape}")
    if h.shape != g.shape:
        raise ValueError(f"{what}: heat shape {h.shape} does not match gt shape {g.shape}")
    return h, g


# ----------------------------------------------------------------------------- building blocks

def minmax_normalize(heat) -> np.ndarray:
    """Linearly map ``heat`` to [0, 1] (float64). A constant map becomes all zeros."""
    h = _heat(heat)
    lo, hi = h.min(), h.max()
    return (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)


def mean_threshold(heat) -> np.ndarray:
    """The method's binary mask: min-max normalise, then ``heat > mean`` (strict)."""
    h = minmax_normalize(heat)
    return h > h.mean()


def average_precision(scores, labels) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n, one threshold per distinct score, in decreasing order.

    Same definition as scikit-learn's ``average_precision_score``. Returns NaN without positives.
    """
    s, y = _heat(scores, "scores").ravel(), _mask(labels, "labels").ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in size")
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    # The last index of each run of equal scores: a threshold admits all tied pixels at once.
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _iou(inter: int, union: int) -> float:
    return inter / union if union > 0 else float("nan")


def _mean_defined(*values: float) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def mask_boundary(mask) -> np.ndarray:
    """Inner boundary of a binary mask [H, W]: foreground pixels with a 4-neighbour in the background.
    Outside the image counts as the pixel itself, so the image border is not an edge."""
    m = _mask(mask, "mask")
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    p = np.pad(m, 1, mode="edge")
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def boundary_tolerance(shape) -> int:
    """DAVIS's default boundary tolerance in pixels: ceil(0.008 * image diagonal)."""
    return int(math.ceil(0.008 * math.hypot(*shape[-2:])))


def _near(boundary: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within `radius` (Euclidean) of a boundary pixel: dilation with a disk."""
    if radius <= 0 or not boundary.any():
        return boundary
    import cv2  # a package dependency; only this metric needs it

    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = ((yy**2 + xx**2) <= r * r).astype(np.uint8)
    return cv2.dilate(boundary.astype(np.uint8), disk).astype(bool)


def boundary_f_score(pred, gt, tolerance: int | None = None) -> dict:
    """Boundary precision, recall and F of a predicted mask against the truth (see module docstring).

    ``tolerance`` in pixels; None = DAVIS's ceil(0.008 * diagonal)."""
    p, g = _mask(pred, "pred"), _mask(gt, "gt")
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"boundary_f_score: pred {p.shape} and gt {g.shape} must be the same 2-D shape")
    tol = boundary_tolerance(g.shape) if tolerance is None else int(tolerance)
    if tol < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    bp, bg = mask_boundary(p), mask_boundary(g)
    n_p, n_g = int(bp.sum()), int(bg.sum())
    if n_p == 0 and n_g == 0:
        precision = recall = 1.0
    elif n_g == 0:
        precision, recall = 0.0, 1.0
    elif n_p == 0:
        precision, recall = 1.0, 0.0
    else:
        precision = int((bp & _near(bg, tol)).sum()) / n_p
        recall = int((bg & _near(bp, tol)).sum()) / n_g
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"bf": f, "bf_precision": precision, "bf_recall": recall, "tolerance": tol}


# ----------------------------------------------------------------------------- binary protocol

class BinarySegmentationMeter:
    """Dataset-level binary foreground metrics (see module docstring)."""

    def __init__(self, boundary_tolerance: int | None = None) -> None:
        self.boundary_tolerance = boundary_tolerance  # pixels; None = DAVIS's default per image
        self.reset()

    def reset(self) -> None:
        self.n_images = 0
        self.n_pixels = 0
        self.bf_sum = 0.0
        self.correct = 0
        self.inter_fg = self.union_fg = 0
        self.inter_bg = self.union_bg = 0
        self.ap_sum = 0.0
        self.n_map_images = 0
        self.n_map_skipped = 0

    def update(self, heat, gt, valid=None) -> dict:
        """Add one image: heat [H, W] (any float), gt [H, W] (bool or 0/1). Returns per-image values.

        ``valid`` [H, W] (optional, bool or 0/1): only these pixels are scored (e.g. PascalVOC's
        "void" outlines). The method's mask is still ``heat > mean`` over the whole image; the boundary
        F-score compares whole masks (void pixels count as background of the truth)."""
        h, g = _pair(heat, gt, 2, "BinarySegmentationMeter.update")
        h = minmax_normalize(h)
        p = h > h.mean()
        bf = boundary_f_score(p, g, self.boundary_tolerance)["bf"]
        if valid is not None:
            v = _mask(valid, "valid")
            if v.shape != g.shape:
                raise ValueError(f"BinarySegmentationMeter.update: valid shape {v.shape} does not match gt shape {g.shape}")
            if not v.any():
                raise ValueError("BinarySegmentationMeter.update: no valid pixel to score")
            h, g, p = h[v], g[v], p[v]
        i_fg, u_fg = int((p & g).sum()), int((p | g).sum())
        i_bg, u_bg = int((~p & ~g).sum()), int((~p | ~g).sum())
        ap = average_precision(h, g)

        self.n_images += 1
        self.n_pixels += g.size
        self.bf_sum += bf
        self.correct += i_fg + i_bg
        self.inter_fg += i_fg
        self.union_fg += u_fg
        self.inter_bg += i_bg
        self.union_bg += u_bg
        if math.isnan(ap):
            self.n_map_skipped += 1
        else:
            self.ap_sum += ap
            self.n_map_images += 1
        return {"acc": (i_fg + i_bg) / g.size, "iou_fg": _iou(i_fg, u_fg), "iou_bg": _iou(i_bg, u_bg), "ap": ap, "bf": bf}

    def compute(self) -> dict:
        if self.n_images == 0:
            raise ValueError("BinarySegmentationMeter: no images were added")
        iou_fg, iou_bg = _iou(self.inter_fg, self.union_fg), _iou(self.inter_bg, self.union_bg)
        return {
            "acc": self.correct / self.n_pixels,
            "miou": _mean_defined(iou_fg, iou_bg),
            "iou_fg": iou_fg,
            "iou_bg": iou_bg,
            "map": self.ap_sum / self.n_map_images if self.n_map_images else float("nan"),
            # Summed over both classes before dividing (ConceptAttention's code); = acc / (2 - acc).
            "miou_conceptattention_protocol": (self.inter_fg + self.inter_bg) / (self.union_fg + self.union_bg),
            "bf": self.bf_sum / self.n_images,
            "n_images": self.n_images,
            "n_map_images": self.n_map_images,
            "n_map_skipped": self.n_map_skipped,
        }


# ----------------------------------------------------------------------------- multi-concept protocol

def confusion_pair_metrics(heat, target, others) -> dict | None:
    """Eq. 14 metrics for one target concept; None when the target mask is empty.

    heat [H, W] is the target's raw heat; target [H, W] its mask; others [H, W] the union of the
    other concepts' masks (the target's pixels are removed here).
    """
    h = minmax_normalize(heat)
    m_c, m_o = _mask(target, "target mask"), _mask(others, "other masks")
    if not (h.shape == m_c.shape == m_o.shape):
        raise ValueError(f"heat {h.shape}, target {m_c.shape} and others {m_o.shape} must match")
    if not m_c.any():
        return None
    m_o = m_o & ~m_c
    r = m_c | m_o
    on = h > h.mean()  # whole-image mean: the method's own mask
    tp, fp = int((on & m_c).sum()), int((on & m_o).sum())
    fn, tn = int((~on & m_c).sum()), int((~on & m_o).sum())
    iou_t, iou_o = _iou(tp, tp + fp + fn), _iou(tn, tn + fn + fp)
    mass_r = float(h[r].sum())
    return {
        "acc_fg": (tp + tn) / int(r.sum()),
        "miou_fg": _mean_defined(iou_t, iou_o),
        "iou_fg_target": iou_t,
        "iou_fg_other": iou_o,
        "map_fg": average_precision(h[r], m_c[r]),
        "nar": float(h[m_o].sum()) / mass_r if mass_r > 0 else 0.0,
        "nar_zero_mass": mass_r == 0,
    }


class MultiConceptMeter:
    """AnchorDiff multi-concept confusion metrics averaged over image-concept pairs."""

    _KEYS = ("miou_fg", "map_fg", "acc_fg", "nar", "iou_fg_target", "iou_fg_other")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = {k: 0.0 for k in self._KEYS}
        self.counts = {k: 0 for k in self._KEYS}
        self.n_images = 0
        self.n_pairs = 0
        self.n_skipped_pairs = 0
        self.n_nar_zero_mass = 0

    def update(self, heats, masks) -> list[dict | None]:
        """Add one image: heats [K, H, W], masks [K, H, W]; each concept is the target once.

        Returns the per-pair values (None for a skipped pair with an empty target mask).
        """
        h, m = _pair(heats, masks, 3, "MultiConceptMeter.update")
        self.n_images += 1
        out = []
        for k in range(h.shape[0]):
            others = np.delete(m, k, axis=0).any(axis=0)
            res = confusion_pair_metrics(h[k], m[k], others)
            out.append(res)
            if res is None:
                self.n_skipped_pairs += 1
                continue
            self.n_pairs += 1
            self.n_nar_zero_mass += res["nar_zero_mass"]
            for key in self._KEYS:
                if not math.isnan(res[key]):  # only iou_fg_other can be undefined (empty M_other)
                    self.sums[key] += res[key]
                    self.counts[key] += 1
        return out

    def compute(self) -> dict:
        if self.n_pairs == 0:
            raise ValueError("MultiConceptMeter: no image-concept pairs with a non-empty target mask were added")
        out = {k: self.sums[k] / self.counts[k] if self.counts[k] else float("nan") for k in self._KEYS}
        out.update(n_images=self.n_images, n_pairs=self.n_pairs,
                   n_skipped_pairs=self.n_skipped_pairs, n_nar_zero_mass=self.n_nar_zero_mass)
        return out
