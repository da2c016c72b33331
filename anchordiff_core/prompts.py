"""AnchorDiff's choice handed to a point / box segmenter (SAM3 and the like): anchors as point
prompts, masks as boxes. Pure torch.

    pts = anchor_points(anchors.indices[0], grid, image_size)        # per concept: [(x, y), ...] pixels
    pos, neg = point_prompts(pts, concept=0)                          # SAM3's [{"x": int, "y": int}, ...]
    boxes = mask_boxes(mask)                                          # [{"x", "y", "width", "height"}, ...]

Conventions (those of ComfyUI's SAM3_Detect and BOUNDING_BOX): pixels of the image, x across from the
left edge, y down from the top; a point is an anchor token's centre; a box is {"x", "y"} of its top-left
pixel and its "width" / "height" in pixels (inclusive of both edge pixels).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .anchors import PIXELS_PER_TOKEN

BOX_GRID = 128   # connected components are found on at most this many cells per side (see mask_boxes)


def anchor_points(indices: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int],
                  pixels_per_token: int = PIXELS_PER_TOKEN) -> list[list[tuple[int, int]]]:
    """Per concept, the (x, y) pixel centre of each of its anchor tokens (indices [K] or [K, M], -1
    padded), inside an image of size (H, W) whose tokens form `grid` (h, w) from its top-left corner.
    A token of the padded last row / column has its centre clipped into the image."""
    h, w = grid
    height, width = image_size
    if indices.dim() == 1:
        indices = indices[:, None]
    out = []
    for row in indices.tolist():
        pts = []
        for t in row:
            if t < 0:
                continue
            if t >= h * w:
                raise ValueError(f"anchor token {t} outside the {w}x{h} token grid")
            x = min(width - 1, (t % w) * pixels_per_token + pixels_per_token // 2)
            y = min(height - 1, (t // w) * pixels_per_token + pixels_per_token // 2)
            pts.append((int(x), int(y)))
        out.append(pts)
    return out


def point_prompts(points: Sequence[Sequence[tuple[int, int]]], concept: int) -> tuple[list[dict], list[dict]]:
    """(positive, negative) point prompts for one concept: its own anchors positive, every other
    concept's anchors negative (the look-alike the gate kept apart)."""
    if not 0 <= concept < len(points):
        raise ValueError(f"concept {concept} out of range for {len(points)} concepts")
    as_dicts = lambda pts: [{"x": int(x), "y": int(y)} for x, y in pts]
    negative = [p for c, pts in enumerate(points) if c != concept for p in pts]
    return as_dicts(points[concept]), as_dicts(negative)


def _component_labels(cells: torch.Tensor) -> torch.Tensor:
    """8-connected component labels (> 0, arbitrary) of a 2-D bool grid, 0 outside: each cell takes
    the largest label of its neighbourhood until nothing changes."""
    h, w = cells.shape
    labels = torch.where(cells, torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w), torch.zeros(()))
    for _ in range(h * w):
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * cells
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def mask_boxes(mask: torch.Tensor, min_area: float = 0.0) -> list[dict]:
    """Boxes of a mask's connected parts ([H, W], > 0.5 is inside), largest first, as ComfyUI's
    BOUNDING_BOX dicts. Parts are found on a grid of at most BOX_GRID cells per side (a cell is inside
    if any of its pixels is), so parts closer than one cell (H / BOX_GRID px) count as one; each box
    is then the exact extent of its part's pixels. Parts under `min_area` of the image are dropped."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [H, W]; got shape {tuple(mask.shape)}")
    inside = mask.detach().float().cpu() > 0.5
    height, width = inside.shape
    if not inside.any():
        return []
    cell = max(1, -(-max(height, width) // BOX_GRID))
    ph, pw = -(-height // cell) * cell, -(-width // cell) * cell
    padded = F.pad(inside.float(), (0, pw - width, 0, ph - height))
    cells = F.max_pool2d(padded[None, None], cell)[0, 0] > 0
    labels = _component_labels(cells)
    pixel_labels = labels.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:height, :width] * inside
    boxes = []
    for lab in pixel_labels.unique():
        if lab == 0:
            continue
        ys, xs = torch.nonzero(pixel_labels == lab, as_tuple=True)
        if ys.numel() < min_area * height * width:
            continue
        x0, y0 = int(xs.min()), int(ys.min())
        boxes.append({"x": x0, "y": y0, "width": int(xs.max()) - x0 + 1, "height": int(ys.max()) - y0 + 1,
                      "_area": int(ys.numel())})
    boxes.sort(key=lambda b: -b["_area"])
    for b in boxes:
        del b["_area"]
    return boxes
