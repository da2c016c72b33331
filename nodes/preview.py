"""Pictures for the node previews: heat maps over the image, anchor markers, mask overlays.

One colour per concept everywhere.  Each preview is a row of panels (one per concept) at most
PANEL_SIZE pixels on a side; `layout()` tells the web extension how to map a click on it back to
image pixels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

PANEL_SIZE = 384
PALETTE = [  # colour-blind friendly (Okabe-Ito), then extras; RGB 0..255
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
    (213, 94, 0), (204, 121, 167), (255, 255, 255), (153, 153, 153), (170, 68, 153),
]


def concept_color(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def panel_scale(image_size: tuple[int, int]) -> float:
    return min(1.0, PANEL_SIZE / max(image_size))


def _background(image: Optional[torch.Tensor], size: tuple[int, int]) -> np.ndarray:
    """Greyscale, darkened image (or dark grey) as uint8 RGB at `size` (H, W)."""
    h, w = size
    if image is None:
        return np.full((h, w, 3), 40, np.uint8)
    img = image.detach().float().cpu().clamp(0, 1)
    if img.shape[0] != h or img.shape[1] != w:
        img = F.interpolate(img.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    grey = (img[..., :3].mean(-1, keepdim=True) * 0.6).expand(-1, -1, 3)
    return (grey.numpy() * 255).astype(np.uint8)


LABEL_FONT, LABEL_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.55


def _label(canvas: np.ndarray, text: str, color, line: int = 0) -> None:
    """`text` in `color` on a solid dark box, one label per line from the top left: no outline
    stroke that can drift from the letters, and labels never run into each other."""
    (tw, th), base = cv2.getTextSize(text, LABEL_FONT, LABEL_SCALE, 1)
    pad, h = 3, th + base + 6
    x0, y0 = 4, 4 + line * (h + 2)
    x1, y1 = min(canvas.shape[1] - 1, x0 + tw + 2 * pad), min(canvas.shape[0] - 1, y0 + h)
    if y0 >= canvas.shape[0]:
        return
    canvas[y0:y1, x0:x1] = (canvas[y0:y1, x0:x1].astype(np.float32) * 0.25).astype(np.uint8)
    cv2.putText(canvas, text, (x0 + pad, y0 + 3 + th), LABEL_FONT, LABEL_SCALE, color, 1, cv2.LINE_AA)


def _marker(canvas: np.ndarray, x: float, y: float, color, manual: bool) -> None:
    center = (int(round(x)), int(round(y)))
    kind = cv2.MARKER_DIAMOND if manual else cv2.MARKER_CROSS
    cv2.circle(canvas, center, 11, (0, 0, 0), 4, cv2.LINE_AA)
    cv2.circle(canvas, center, 11, color, 2, cv2.LINE_AA)
    cv2.drawMarker(canvas, center, (255, 255, 255), kind, 14, 2, cv2.LINE_AA)


def heat_panels(
    soft: torch.Tensor,
    names: Sequence[str],
    image: Optional[torch.Tensor] = None,
    points: Optional[Sequence[Sequence[tuple[float, float]]]] = None,
    manual: Optional[Sequence[bool]] = None,
) -> torch.Tensor:
    """[K, H, W] maps in [0, 1] -> one IMAGE [1, h, K*w, 3]: a panel per concept, heat in the
    concept's colour over the image, anchor markers at `points` (image pixel coordinates)."""
    k, height, width = soft.shape
    scale = panel_scale((height, width))
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    small = F.interpolate(soft.float()[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).cpu().numpy()
    base = _background(image, (h, w)).astype(np.float32)
    panels = []
    for c in range(k):
        color = np.array(concept_color(c), np.float32)
        alpha = small[c][..., None]
        canvas = np.clip(base * (1 - alpha) + color * alpha, 0, 255).astype(np.uint8)
        for x, y in (points[c] if points else []):
            _marker(canvas, x * scale, y * scale, concept_color(c), bool(manual and manual[c]))
        _label(canvas, f"{c + 1}: {names[c]}", concept_color(c))
        panels.append(canvas)
    return torch.from_numpy(np.concatenate(panels, axis=1)).float().div(255)[None]


def mask_overlay(masks: torch.Tensor, names: Sequence[str], image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[K, H, W] binary masks -> IMAGE [1, h, w, 3]: every concept's mask in its colour, outlined."""
    k, height, width = masks.shape
    scale = panel_scale((height, width))
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    small = F.interpolate(masks.float()[:, None], size=(h, w), mode="nearest")[:, 0].cpu().numpy() > 0.5
    canvas = _background(image, (h, w)).astype(np.float32)
    for c in range(k):
        color = np.array(concept_color(c), np.float32)
        canvas[small[c]] = canvas[small[c]] * 0.45 + color * 0.55
    canvas = canvas.astype(np.uint8)
    for c in range(k):
        contours, _ = cv2.findContours(small[c].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, concept_color(c), 2, cv2.LINE_AA)
    for c, n in enumerate(names):
        _label(canvas, f"{c + 1}: {n}", concept_color(c), line=c)
    return torch.from_numpy(canvas).float().div(255)[None]


def layout(names: Sequence[str], image_size: tuple[int, int], panels: int, manual: Sequence[bool] = ()) -> dict:
    """What the web extension needs to turn a click on the preview into an image pixel."""
    return {
        "concepts": list(names),
        "colors": ["#%02x%02x%02x" % concept_color(c) for c in range(len(names))],
        "image_size": [int(image_size[0]), int(image_size[1])],
        "panels": int(panels),
        "manual": [bool(m) for m in manual],
    }
