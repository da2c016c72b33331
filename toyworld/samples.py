"""Do the toy SD3's samples show what their captions name? Colour and shape of single-object samples.

    python -m toyworld.samples --n 50 [--json out.json]

For n single-object captions ("a red circle on grass": shape, colour and ground drawn from the test
split's seeds), the toy generates one image each through ComfyUI (KSampler euler / sgm_uniform,
20 steps, cfg 5, the workflows' settings) and two tests read it with the world's own definitions:

- colour: every pixel goes to the nearest of the 8 palette colours (as the world shades them, 0.88 to
  1.12 of the palette value) or to the caption's ground (its base colour +- its texture range); the
  sample shows the named colour when that colour holds the most object pixels, and at least
  MIN_OBJECT_FRACTION of the image;
- shape: the largest connected region of the named colour's pixels is compared with each of the 5
  shapes of the world, placed at its centroid with the radius its area implies, at the rotations the
  world draws (-0.4..0.4 rad); the sample shows the named shape when that template fits it best (IoU).

The same tests on the world's own renderings of the same captions (`--truth`) say how far the tests
themselves can be trusted: they must read nearly every true scene right.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .world import BACKGROUNDS, COLOURS, SHAPES, SPLITS, Obj, _background, _grid, _inside, _value_noise

MIN_OBJECT_FRACTION = 0.005     # an object under 0.5% of the image (a 18 x 18 px patch at 256) is none
SHADE = (0.88, 1.12)            # the world's shading range of an object's colour (world.make_scene)
ANGLES = np.linspace(-0.4, 0.4, 9)


def single_object_caption(seed: int) -> tuple[str, str, str]:
    """(shape, colour, ground) of the seed's single-object caption."""
    rng = np.random.default_rng([seed, 7])
    return (SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))],
            BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


def caption(shape: str, colour: str, ground: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} on {ground}"


def render_truth(shape: str, colour: str, ground: str, seed: int, size: int = 256) -> np.ndarray:
    """The world's rendering of one centred object of the caption (a reference for the tests)."""
    rng = np.random.default_rng([seed, 8])
    radius = float(rng.uniform(0.12, 0.25))
    cx, cy = rng.uniform(radius, 1 - radius, size=2)
    obj = Obj(shape, colour, float(cx), float(cy), radius, float(rng.uniform(-0.4, 0.4)) if shape != "circle" else 0.0)
    image = _background(np.random.default_rng([seed, 1]), ground, size)
    xs, ys = _grid(size)
    inside = _inside(obj, xs, ys)
    shade = _value_noise(np.random.default_rng([seed, 2]), size, 8)
    image[inside] = np.array(COLOURS[colour], float) * (SHADE[0] + (SHADE[1] - SHADE[0]) * shade[inside, None])
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _ground_range(ground: str) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) RGB of the ground texture: the world's base +- variation (world._background)."""
    flat = np.concatenate([_background(np.random.default_rng(s), ground, 96).reshape(-1, 3) for s in range(8)])
    return flat.min(0), flat.max(0)


def label_pixels(image: np.ndarray, ground: str) -> np.ndarray:
    """[H, W] int: index into list(COLOURS) of the nearest shaded palette colour, or -1 for ground."""
    px = image.reshape(-1, 3).astype(np.float64)
    dists = []
    for rgb in COLOURS.values():
        c = np.array(rgb, float)
        # distance to the segment c * s, s in SHADE
        s = np.clip(px @ c / (c @ c), *SHADE)
        dists.append(np.linalg.norm(px - s[:, None] * c, axis=1))
    low, high = _ground_range(ground)
    dists.append(np.linalg.norm(px - np.clip(px, low, high), axis=1))
    label = np.argmin(np.stack(dists, 1), 1)
    label[label == len(COLOURS)] = -1
    return label.reshape(image.shape[:2])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    import cv2
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask)
    return labels == (1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])))


def _unit_area(shape: str, n: int = 400) -> float:
    """Area (fraction of the image) of the shape at radius 1/4, times 16: area per radius^2."""
    xs, ys = _grid(n)
    return float(_inside(Obj(shape, "red", 0.5, 0.5, 0.25, 0.0), xs, ys).mean()) * 16


def fit_shape(region: np.ndarray) -> tuple[str, float]:
    """(shape whose template fits the region best, its IoU)."""
    size = region.shape[0]
    xs, ys = _grid(size)
    cy, cx = (np.argwhere(region).mean(0) + 0.5) / size
    best = ("", -1.0)
    for shape in SHAPES:
        radius = float(np.sqrt(region.mean() / _unit_area(shape)))
        for angle in (ANGLES if shape != "circle" else [0.0]):
            t = _inside(Obj(shape, "red", float(cx), float(cy), radius, float(angle)), xs, ys)
            iou = float((t & region).sum() / max(1, (t | region).sum()))
            if iou > best[1]:
                best = (shape, iou)
    return best


def read_sample(image: np.ndarray, ground: str) -> dict:
    """What one image shows: its dominant object colour (or None) and the shape of that colour's
    largest region."""
    labels = label_pixels(image, ground)
    counts = np.bincount(labels[labels >= 0], minlength=len(COLOURS))
    names = list(COLOURS)
    if counts.max() < MIN_OBJECT_FRACTION * labels.size:
        return {"colour": None, "shape": None, "shape_iou": 0.0, "object_fraction": float(counts.max() / labels.size)}
    colour = names[int(np.argmax(counts))]
    region = _largest_component(labels == names.index(colour))
    shape, iou = fit_shape(region)
    return {"colour": colour, "shape": shape, "shape_iou": iou, "object_fraction": float(counts.max() / labels.size)}


def sample_accuracy(n: int, truth: bool = False, steps: int = 20, cfg: float = 5.0, size: int = 256) -> dict:
    toy = None
    if not truth:
        from .comfy_run import ToyComfy
        toy = ToyComfy()
    rows = []
    for seed in SPLITS["test"].seeds(n):
        shape, colour, ground = single_object_caption(seed)
        text = caption(shape, colour, ground)
        image = render_truth(shape, colour, ground, seed, size) if truth else \
            toy.generate(text, seed=seed, size=size, steps=steps, cfg=cfg)[0]
        got = read_sample(image, ground)
        rows.append({"seed": seed, "caption": text, **got,
                     "colour_ok": got["colour"] == colour, "shape_ok": got["colour"] == colour and got["shape"] == shape})
    k = len(rows)
    return {"n": k, "source": "world renderings" if truth else "toy samples", "steps": steps, "cfg": cfg, "size": size,
            "colour_rate": sum(r["colour_ok"] for r in rows) / k,
            "shape_rate": sum(r["shape_ok"] for r in rows) / k,
            "both_rate": sum(r["colour_ok"] and r["shape_ok"] for r in rows) / k,
            "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--truth", action="store_true", help="read the world's own renderings instead (checks the tests)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    t0, c0 = time.perf_counter(), time.process_time()
    res = sample_accuracy(args.n, truth=args.truth, steps=args.steps, cfg=args.cfg)
    res["wall_s"], res["cpu_s"] = round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1)
    print(f"{res['source']}: {res['n']} single-object captions; colour right {res['colour_rate']:.0%}, "
          f"named shape in the named colour {res['shape_rate']:.0%} ({res['wall_s']} s wall, {res['cpu_s']} s CPU)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
