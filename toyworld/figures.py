"""Pictures for the toy model's card: loss curves, VAE reconstructions, samples, attention.

    python -m toyworld.figures --out docs/images

Writes toy_training.png (loss curves from toyworld/weights/*_loss.csv and the validation anchor
accuracy from toyworld/weights/dit_val.csv, over all training periods), toy_vae.png (world scenes
and their VAE round trip through ComfyUI), toy_samples.png (KSampler through ComfyUI from held-out
captions, next to the true scene of that caption).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .comfy_run import WEIGHTS
from .world import SPLITS, make_scene


def _csv(path: Path) -> dict[str, np.ndarray]:
    rows = list(csv.DictReader(open(path)))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def line_plot(series: list[tuple[np.ndarray, np.ndarray, tuple]], title: str, xlabel: str, log: bool = False,
              size=(420, 260)) -> Image.Image:
    """A small line chart drawn with PIL (no plotting dependency for two curves)."""
    w, h = size
    left, right, top, bottom = 52, 12, 24, 34
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = np.concatenate([s[0] for s in series])
    ys = np.concatenate([s[1] for s in series])
    f = np.log10 if log else (lambda v: v)
    x0, x1 = float(xs.min()), float(xs.max()) or 1.0
    y0, y1 = float(f(ys.min())), float(f(ys.max()))
    y1 = y1 if y1 > y0 else y0 + 1
    px = lambda x: left + (x - x0) / (x1 - x0 or 1) * (w - left - right)
    py = lambda y: top + (1 - (f(y) - y0) / (y1 - y0)) * (h - top - bottom)
    d.rectangle([left, top, w - right, h - bottom], outline=(120, 120, 120))
    for t in np.linspace(y0, y1, 5):
        v = 10 ** t if log else t
        d.text((4, py(v) - 5), f"{v:.3g}", fill=(60, 60, 60))
    for t in np.linspace(x0, x1, 5):
        d.text((px(t) - 10, h - bottom + 4), f"{t:.0f}", fill=(60, 60, 60))
    d.text((left, 4), title, fill=(0, 0, 0))
    d.text((w // 2 - 30, h - 14), xlabel, fill=(60, 60, 60))
    for x, y, colour in series:
        d.line([(px(a), py(b)) for a, b in zip(x, y)], fill=colour, width=2 if colour != (190, 190, 190) else 1)
    return img


VAL_SERIES = [("phrase_ci_all", (200, 40, 40), "phrase anchors, paper (concept-to-image)"),
              ("phrase_ic_mean", (40, 90, 200), "phrase anchors, image-to-concept"),
              ("word_ci_all", (230, 140, 30), "word anchors, paper"),
              ("phrase_true_centre_iou", (40, 150, 60), "mask IoU with the true centre")]


def loss_figure(out: Path) -> None:
    dit = _csv(WEIGHTS / "dit_loss.csv")
    vae = _csv(WEIGHTS / "vae_loss.csv")
    k = 10
    smooth = np.convolve(dit["loss"], np.ones(k) / k, mode="valid")
    a = line_plot([(dit["step"], dit["loss"], (190, 190, 190)), (dit["step"][k - 1:], smooth, (200, 40, 40))],
                  "toy SD3: rectified-flow loss (grey: logged batches, red: mean of 10)", "step (batch 8)")
    b = line_plot([(vae["step"], vae["recon_mse"], (40, 90, 200))], "toy VAE decoder: reconstruction MSE (log)",
                  "step (batch 8, 64 px crops)", log=True)
    panels = [a]
    if (WEIGHTS / "dit_val.csv").exists():
        val = _csv(WEIGHTS / "dit_val.csv")
        v = line_plot([(val["step"], np.full_like(val["step"], 0.7), (190, 190, 190))]
                      + [(val["step"], val[k], c) for k, c, _ in VAL_SERIES],
                      f"validation (12 scenes, record_at {val['record_at'][0]:.2f}); grey: 0.7 target",
                      "step", size=(460, 260))
        legend = Image.new("RGB", (v.width, v.height + 28), "white")
        legend.paste(v, (0, 0))
        d = ImageDraw.Draw(legend)
        for i, (_, colour, label) in enumerate(VAL_SERIES):
            d.text((52 + 210 * (i % 2), v.height + 2 + 13 * (i // 2)), label, fill=colour)
        panels.append(legend)
    panels.append(b)
    img = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        img.paste(panel, (x, 0))
        x += panel.width
    img.save(out / "toy_training.png")


def grid(rows: list[list[tuple[np.ndarray, str]]], tile: int = 160) -> Image.Image:
    cols = max(len(r) for r in rows)
    img = Image.new("RGB", (cols * (tile + 6) + 6, len(rows) * (tile + 22) + 6), (24, 24, 28))
    d = ImageDraw.Draw(img)
    for i, row in enumerate(rows):
        for j, (a, label) in enumerate(row):
            x, y = 6 + j * (tile + 6), 6 + i * (tile + 22)
            img.paste(Image.fromarray(a).resize((tile, tile)), (x, y))
            d.text((x, y + tile + 4), label[:28], fill=(220, 220, 220))
    return img


def samples_figure(out: Path, n: int = 6, steps: int = 24) -> None:
    import torch
    from .comfy_run import ToyComfy
    toy = ToyComfy()
    seeds = list(SPLITS["val"].seeds(n))
    truth, gen, recon = [], [], []
    for s in seeds:
        scene = make_scene(s)
        truth.append((scene.image, scene.caption))
        image, _ = toy.generate(scene.caption, seed=s, steps=steps)
        gen.append((image, f"sample {s - SPLITS['val'].start}"))
        lat = toy.latent(scene.image)
        back = toy.nodes.VAEDecode().decode(toy.vae, lat)[0][0]
        recon.append(((back.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), "VAE round trip"))
    grid([truth, recon]).save(out / "toy_vae.png")
    grid([truth, gen]).save(out / "toy_samples.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/images")
    p.add_argument("--no-samples", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loss_figure(out)
    if not args.no_samples:
        samples_figure(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
