"""Figures for the README, made from the synthetic look-alike scene the tests use.

    .venv/bin/python -m scripts.make_figures   # writes docs/images/gate_ablation.png
"""
import os
import sys

import cv2
import numpy as np
import torch

if not __package__:  # run as a file, the repository's packages are not importable
    sys.exit("run this from the repository root as a module: python -m scripts.make_figures")

import anchordiff_core as ad  # noqa: E402
from anchordiff_core.auto import PAPER_GATE_PERCENTILE  # noqa: E402
from tests.synthetic import look_alike_scene  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZE = 192


def panel(values: torch.Tensor, title: str, anchor: int, outline: torch.Tensor) -> np.ndarray:
    grid = values.view(16, 16).numpy()
    img = cv2.applyColorMap((np.clip(grid, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
    for region, colour in ((1, (255, 255, 255)), (2, (120, 200, 255))):
        mask = cv2.resize((outline == region).view(16, 16).numpy().astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, colour, 1)
    y, x = divmod(anchor, 16)
    cv2.drawMarker(img, (int((x + 0.5) * SIZE / 16), int((y + 0.5) * SIZE / 16)), (0, 255, 0), cv2.MARKER_CROSS, 14, 2)
    canvas = np.full((SIZE + 28, SIZE, 3), 255, np.uint8)
    canvas[28:] = img
    cv2.putText(canvas, title, (4, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def main():
    a_ii, o_ii, region = look_alike_scene(background_noise=2.0)  # a cluttered background
    anchor = int(torch.nonzero(region == 1)[12])
    w_cos = ad.cosine_similarity_rows(o_ii)[anchor].clamp_min(0)
    ungated = ad.propagate(ad.build_gated_graph(a_ii, o_ii, None), torch.tensor([anchor]))[0]
    gated = ad.propagate(ad.build_gated_graph(a_ii, o_ii, PAPER_GATE_PERCENTILE), torch.tensor([anchor]))[0]
    mask = ad.to_mask(gated[None], (16, 16), (16, 16))[0].flatten()
    panels = [
        panel(ad.minmax_rows(w_cos[None])[0], "output similarity", anchor, region),
        panel(ungated, "propagated, no gate", anchor, region),
        panel(gated, "propagated, gated", anchor, region),
        panel(mask, "mask (> mean)", anchor, region),
    ]
    gap = np.full((SIZE + 28, 8, 3), 255, np.uint8)
    row = np.concatenate(sum([[p, gap] for p in panels], [])[:-1], axis=1)
    out = os.path.join(ROOT, "docs", "images", "gate_ablation.png")
    cv2.imwrite(out, row)
    print(out)


if __name__ == "__main__":
    main()
