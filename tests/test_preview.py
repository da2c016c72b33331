"""Preview labels (nodes/preview.py): readable, one per line, each in its concept's colour."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

spec = importlib.util.spec_from_file_location("preview", Path(__file__).resolve().parents[1] / "nodes" / "preview.py")
preview = importlib.util.module_from_spec(spec)
spec.loader.exec_module(preview)


def colour_rows(img: np.ndarray, colour, tol=40) -> np.ndarray:
    """Rows (of the top 90 px) holding pixels close to `colour` (anti-aliased letters are darker)."""
    near = np.abs(img[:90].astype(int) - np.array(colour)).sum(-1) < tol
    return np.nonzero(near.any(1))[0]


def test_mask_preview_labels_each_concept_on_its_own_line_in_its_colour():
    masks = torch.zeros(3, 256, 320, dtype=torch.bool)
    white = torch.ones(256, 320, 3)  # a bright image: labels must still read (dark box behind)
    img = (preview.mask_overlay(masks, ["orange circle", "red circle", "sky"], white)[0] * 255).round().byte().numpy()
    bands = [colour_rows(img, preview.concept_color(c)) for c in range(3)]
    assert all(len(b) for b in bands), "each label is drawn in its concept's colour"
    for a, b in zip(bands, bands[1:]):
        assert a.max() < b.min(), "labels on separate lines, top to bottom in concept order"

