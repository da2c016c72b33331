"""Draw workflows/<name>.jpg, the card ComfyUI's template browser shows for workflows/<name>.json.

    .venv/bin/python -m scripts.make_thumbnails

Each card is a schematic made from the workflow itself: the title of its *Read me* note and its
groups (the stages, in their colours, top to bottom). No model output is shown: the example
workflows were never run with real weights here.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
SIZE = 512
BACKGROUND = "#14202e"


def font(size: int):
    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font


def title_of(workflow: dict) -> str:
    for node in workflow["nodes"]:
        if node["type"] == "MarkdownNote":
            first = node["widgets_values"][0].strip().splitlines()[0]
            title = first.lstrip("# ").removeprefix("AnchorDiff:").strip()
            return title[:1].upper() + title[1:]
    raise ValueError("no Read me note")


def stages(workflow: dict) -> list[tuple[str, str]]:
    groups = sorted(workflow["groups"], key=lambda g: (g["bounding"][0], g["bounding"][1]))
    return [(g["title"], g.get("color") or "#3f789e") for g in groups]


def draw(workflow: dict) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    d.text((28, 22), "AnchorDiff", font=font(22), fill="#e69f00")
    y = 56
    for line in textwrap.wrap(title_of(workflow), 28):
        d.text((28, y), line, font=font(30), fill="white")
        y += 36
    boxes = stages(workflow)
    top, bottom, gap = y + 20, SIZE - 24, 22
    height = (bottom - top - gap * (len(boxes) - 1)) / len(boxes)
    for i, (text, colour) in enumerate(boxes):
        y0 = top + i * (height + gap)
        d.rounded_rectangle((28, y0, SIZE - 28, y0 + height), radius=14, fill=colour)
        lines = textwrap.wrap(text, 34)[:2]
        ty = y0 + (height - 26 * len(lines)) / 2
        for line in lines:
            d.text((46, ty), line, font=font(22), fill="white")
            ty += 26
        if i:
            cx, ya = SIZE / 2, y0 - gap
            d.polygon([(cx - 10, ya + 4), (cx + 10, ya + 4), (cx, ya + gap - 4)], fill="#cfd8dc")
    return img


def main() -> None:
    for ui in sorted((ROOT / "workflows").glob("*.json")):
        out = ui.with_suffix(".jpg")
        draw(json.loads(ui.read_text(encoding="utf-8"))).save(out, quality=88)
        print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
