"""AnchorDiff's anchors and masks as point / box prompts (anchordiff_core.prompts, the Points and
Boxes node), in the formats ComfyUI's SAM3_Detect parses, checked through SAM3's own code where the
ComfyUI version has it."""
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from anchordiff_core.prompts import anchor_points, mask_boxes, point_prompts


def test_anchor_points_are_token_centres_x_across_y_down():
    # a non-square image (H 40, W 72 -> grid 3 x 5 at 16 px, last row and column padded)
    grid, size = (3, 5), (40, 72)
    pts = anchor_points(torch.tensor([[1 * 5 + 3, -1], [2 * 5 + 4, 0]]), grid, size)
    assert pts == [[(3 * 16 + 8, 1 * 16 + 8)], [(71, 39), (8, 8)]]   # padded token clipped into the image
    with pytest.raises(ValueError):
        anchor_points(torch.tensor([15]), grid, size)


def test_point_prompts_positive_own_negative_others():
    pos, neg = point_prompts([[(10, 20)], [(30, 40), (50, 60)], []], concept=1)
    assert pos == [{"x": 30, "y": 40}, {"x": 50, "y": 60}] and neg == [{"x": 10, "y": 20}]
    assert json.loads(json.dumps(pos)) == pos


def test_mask_boxes_one_per_part_largest_first_exact_extent():
    m = torch.zeros(100, 160)
    m[10:20, 30:50] = 1          # 10 x 20
    m[60:90, 100:150] = 1        # 30 x 50: the largest
    m[60, 5] = 1                 # a single pixel
    assert mask_boxes(m) == [{"x": 100, "y": 60, "width": 50, "height": 30},
                             {"x": 30, "y": 10, "width": 20, "height": 10},
                             {"x": 5, "y": 60, "width": 1, "height": 1}]
    assert mask_boxes(m, min_area=0.001) == mask_boxes(m)[:2]
    assert mask_boxes(torch.zeros(8, 8)) == []
    # an L-shaped part is one box; a large image goes through the coarse grid and stays exact
    big = torch.zeros(1000, 1300)
    big[100:400, 200:260] = 1
    big[340:400, 200:700] = 1
    assert mask_boxes(big) == [{"x": 200, "y": 100, "width": 500, "height": 300}]


def _sam3_detect(positive, negative, boxes, image_hw):
    """Run ComfyUI's SAM3_Detect.execute up to the model with a recording stand-in model: what its own
    code makes of our strings and boxes (point_coords in its 1008 x 1008 frame, box corners)."""
    sam3 = pytest.importorskip("comfy_extras.nodes_sam3", reason="SAM3 is in ComfyUI 0.4+ (CI runs it on 0.33.0)")
    import comfy.model_management
    seen = []

    class Recorder:
        def forward_segment(self, frame, point_inputs=None, box_inputs=None, mask_inputs=None):
            seen.append({"points": point_inputs, "box": box_inputs})
            return torch.zeros(1, 1, 32, 32)

    model = SimpleNamespace(model=SimpleNamespace(get_dtype=lambda: torch.float32, diffusion_model=Recorder()))
    load = comfy.model_management.load_model_gpu
    comfy.model_management.load_model_gpu = lambda m: None
    try:
        image = torch.zeros(1, *image_hw, 3)
        sam3.SAM3_Detect.execute(model, image, positive_coords=positive, negative_coords=negative,
                                 bboxes=boxes, refine_iterations=1)
    finally:
        comfy.model_management.load_model_gpu = load
    return seen


def _sam3_video_track(initial_mask, frames):
    """Run ComfyUI's SAM3_VideoTrack.execute with a recording stand-in model: the first-frame masks
    its own code hands the tracker (one per object)."""
    sam3 = pytest.importorskip("comfy_extras.nodes_sam3", reason="SAM3 is in ComfyUI 0.4+ (CI runs it on 0.33.0)")
    import comfy.model_management
    seen = {}

    class Recorder:
        def forward_video(self, images, initial_masks=None, **kw):
            seen.update(images=images, initial_masks=initial_masks)
            return {}

    model = SimpleNamespace(model=SimpleNamespace(get_dtype=lambda: torch.float32, diffusion_model=Recorder()))
    load = comfy.model_management.load_model_gpu
    comfy.model_management.load_model_gpu = lambda m: None
    try:
        sam3.SAM3_VideoTrack.execute(frames, model, initial_mask=initial_mask)
    finally:
        comfy.model_management.load_model_gpu = load
    return seen


def test_sam3_reads_our_points_and_boxes_as_intended(comfy):
    h, w = 40, 72  # non-square: an x / y swap shows
    pts = anchor_points(torch.tensor([[1 * 5 + 3], [2 * 5 + 0]]), (3, 5), (h, w))
    pos, neg = point_prompts(pts, concept=0)
    m = torch.zeros(h, w)
    m[16:32, 48:64] = 1
    seen = _sam3_detect(json.dumps(pos), json.dumps(neg), mask_boxes(m), (h, w))
    points = seen[0]["points"]
    coords, labels = points["point_coords"][0].tolist(), points["point_labels"][0].tolist()
    assert labels == [1, 0]
    assert sum(coords, []) == pytest.approx([56 / w * 1008, 24 / h * 1008, 8 / w * 1008, 39 / h * 1008], rel=1e-3)  # x across, y down
    (x0, y0), (x1, y1) = seen[1]["box"][0].tolist()
    assert (x0, y0, x1, y1) == pytest.approx((48 / w * 1008, 16 / h * 1008, 64 / w * 1008, 32 / h * 1008), rel=1e-4)


def test_points_and_boxes_node_on_the_toy(comfy):
    """Through the nodes on the trained toy: the node's strings are the anchors Anchor Select chose,
    its boxes those of the Mask node's mask; a batch with different anchors is refused with advice."""
    from toyworld import SPLITS, make_scene
    from toyworld.comfy_run import ToyComfy
    toy = ToyComfy()
    scene = make_scene(SPLITS["val"].start + 3)
    names = [c.name for c in scene.concepts if c.level == "phrase"][:2]
    maps = toy.look(scene.image, scene.caption, names, 0.85)
    anchors = toy.run("AnchorDiffAnchorSelect", maps, 1, 8.0, 0.5, "", False)[0]
    graph = toy.run("AnchorDiffBuildGatedGraph", maps, 98.0, "", True)[0]
    heat = toy.run("AnchorDiffPropagate", graph, anchors, 160)[0]
    mask = toy.run("AnchorDiffMask", heat, names[1], "mean", 0.5)[0]
    pos, neg, boxes = toy.run("AnchorDiffSegmenterPrompts", anchors, "2", mask)
    pts = anchor_points(anchors.indices[0], maps.grid, maps.image_size)
    assert json.loads(pos) == [{"x": x, "y": y} for x, y in pts[1]]
    assert json.loads(neg) == [{"x": x, "y": y} for x, y in pts[0]]
    assert boxes == mask_boxes(mask[0]) and boxes
    with pytest.raises(Exception, match="does not exist|Unknown concept"):
        toy.run("AnchorDiffSegmenterPrompts", anchors, "no such concept")
    if importlib.util.find_spec("comfy_extras.nodes_sam3") is not None:
        # the Mask node's MASK [1, H, W] as SAM3_VideoTrack's first-frame masks: one object, its pixels as they are
        frames = torch.from_numpy(scene.image).float().div(255)[None].repeat(3, 1, 1, 1)
        seen = _sam3_video_track(mask, frames)
        assert seen["initial_masks"].shape == (1, 1, *scene.image.shape[:2])
        assert torch.equal(seen["initial_masks"][:, 0], mask) and seen["images"].shape == (3, 3, *scene.image.shape[:2])
    with pytest.raises(Exception, match="mask is"):
        toy.run("AnchorDiffSegmenterPrompts", anchors, names[0], mask[:, :128])
