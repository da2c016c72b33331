"""Images whose sides are not multiples of 16 px: the token grid covers a padded area (the latent is
padded to whole tokens at the bottom and right), and the masks must be that grid with the padding
CROPPED, never the grid stretched over the image. An object at a known place in a 1000 x 600 and a
776 x 1032 image, through the core (pipeline.heat_masks) and through the nodes (Anchor Select's
markers, Mask); tests/test_capture.py records such sizes through the sampler."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anchordiff_core import pipeline
from anchordiff_core.maps import AttentionMaps

REPO = Path(__file__).resolve().parents[1]
TOKEN = 16

# (width, height) of the image; the object's token rows and columns (inclusive start, exclusive end)
CASES = [((1000, 600), (10, 15), (40, 48)), ((776, 1032), (50, 56), (30, 36)),
         ((1000, 600), (33, 38), (55, 63))]   # the last touches the padded bottom-right border


def grid_of(width, height):
    return math.ceil(height / TOKEN), math.ceil(width / TOKEN)


def object_heat(size, rows, cols) -> pipeline.Heat:
    width, height = size
    h, w = grid_of(width, height)
    values = torch.zeros(h, w)
    values[rows[0]:rows[1], cols[0]:cols[1]] = 1.0
    return pipeline.Heat(values.reshape(1, 1, -1), (h, w), (height, width), ("thing",), "test", "x")


def check_lined_up(mask: torch.Tensor, size, rows, cols) -> None:
    """The mask of a block of tokens is that block in pixels (rows 16 r0 .. 16 r1, columns 16 c0 ..
    16 c1), widened by half a token on each side by the bilinear heat (mean threshold), cut at the
    image's edge, and centred on the block: a grid stretched over the image instead (608 px of
    tokens squeezed into 600) would move it by up to 6 px."""
    width, height = size
    assert mask.shape == (height, width)
    ys, xs = mask.nonzero(as_tuple=True)
    box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    half = TOKEN // 2
    assert box == (rows[0] * TOKEN - half, min(rows[1] * TOKEN + half, height),
                   cols[0] * TOKEN - half, min(cols[1] * TOKEN + half, width)), box
    assert bool(mask[rows[0] * TOKEN:rows[1] * TOKEN, cols[0] * TOKEN:cols[1] * TOKEN].all())  # the block itself
    if box[1] < height and box[3] < width:  # inside the image: symmetric about the block's centre
        inside = mask[box[0]:box[1], box[2]:box[3]]
        assert torch.equal(inside, inside.flip(0)) and torch.equal(inside, inside.flip(1))


@pytest.mark.parametrize("size, rows, cols", CASES)
def test_core_masks_line_up_with_the_image(size, rows, cols):
    heat = object_heat(size, rows, cols)
    mask = pipeline.heat_masks(heat)[0, 0]
    check_lined_up(mask, size, rows, cols)
    soft = pipeline.heat_masks(heat, soft=True)[0, 0]
    centre = (rows[0] + rows[1]) * TOKEN // 2, (cols[0] + cols[1]) * TOKEN // 2
    assert soft.shape == mask.shape and float(soft[centre]) == float(soft.max()) == 1.0


@pytest.fixture(scope="module")
def nodes(comfy):
    from toyworld import comfy_env

    found = comfy_env.get_nodes(extras=True)
    if "AnchorDiffMask" not in found.NODE_CLASS_MAPPINGS:
        assert comfy_env.load_custom_node_pack(REPO)
    pack = comfy_env.pack_module(REPO)
    return pack, found.NODE_CLASS_MAPPINGS


@pytest.mark.parametrize("size, rows, cols", CASES)
def test_mask_node_lines_up_with_the_image(nodes, size, rows, cols):
    _, N = nodes
    mask, soft = N["AnchorDiffMask"].execute(object_heat(size, rows, cols), "", "mean", 0.5).args
    assert mask.shape == soft.shape == (1, size[1], size[0])
    check_lined_up(mask[0], size, rows, cols)


def peaked_maps(size, row, col) -> AttentionMaps:
    width, height = size
    h, w = grid_of(width, height)
    a_ci = torch.full((1, 1, 1, h * w), 0.1)
    a_ci[..., row * w + col] = 1.0
    a_ii = torch.eye(h * w)[None, None]
    return AttentionMaps(("thing",), (h, w), (height, width), a_ci, a_ci.clone(), a_ii, torch.ones(1, 1, h * w, 4), (0,))


@pytest.mark.parametrize("size, rows, cols", CASES[:2])
def test_anchor_marker_sits_on_the_anchor_x_across_y_down(nodes, size, rows, cols):
    """Anchor Select on a non-square image: the anchor token (row r, column c) is the pixel centre
    (x = 16 c + 8, y = 16 r + 8), and the preview draws its marker there (scaled to the panel)."""
    pack, N = nodes
    stages = sys.modules[pack.__name__ + ".nodes.stages"]
    preview = sys.modules[pack.__name__ + ".nodes.preview"]
    row, col = rows[0] + 1, cols[0] + 2
    maps = peaked_maps(size, row, col)
    anchors = pipeline.pick_anchors(maps)
    assert anchors.indices[0].tolist() == [[row * maps.grid[1] + col]]
    points = stages._anchor_points(anchors)
    assert points == [[[(col * TOKEN + 8, row * TOKEN + 8)]]]
    width, height = size
    picture = preview.heat_panels(torch.zeros(1, height, width), ["thing"], None, points[0])[0].numpy()
    scale = preview.panel_scale((height, width))
    assert picture.shape[:2] == (round(height * scale), round(width * scale))
    white = np.argwhere((picture > 0.99).all(-1))  # the marker's white cross (the label is coloured)
    y, x = white.mean(0)
    assert abs(x - points[0][0][0][0] * scale) <= 1.5 and abs(y - points[0][0][0][1] * scale) <= 1.5, (x, y)
    # the node runs the same path on these maps
    assert N["AnchorDiffAnchorSelect"].execute(maps, 1, 8.0, 0.5, "", False).args[0].indices[0].tolist() == [[row * maps.grid[1] + col]]
