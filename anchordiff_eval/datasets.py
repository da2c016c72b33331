"""The evaluation datasets, read from the files users download (no ComfyUI, no torch).

Each reader yields `Sample`s: the image, the concepts to record, and the ground truth of the first
`len(targets)` of them (the targets; further concepts are auxiliary "background" concepts that are
recorded but not scored).

ImageNet-Segmentation  ``gtsegs_ijcv.mat`` (Guillaumin et al.; 4,276 images). MATLAB v7.3, i.e. HDF5:
    ``/value/img[i, 0]`` refers to the image [3, W, H] uint8, ``/value/gt[i, 0]`` to a 1 x 1 cell whose
    entry is the mask [W, H] (non-zero = object), ``/value/id[i, 0]`` to the image's name as UTF-16
    characters, e.g. ``n02084071_1234``: the WordNet synset, then the ImageNet image number. The file
    has no class names: ``--imagenet-names`` gives them (see `read_name_map`).
PascalVOC 2012 single-class  ``VOC2012/`` as unpacked from VOCtrainval_11-May-2012.tar:
    ``ImageSets/Segmentation/val.txt``, ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
    (palette PNG: 0 background, 1..20 the classes, 255 "void" outlines). Selection, as
    ConceptAttention's evaluation code makes the 930-image split that AnchorDiff reports: the val
    images whose mask, resized to 224 x 224 with nearest-neighbour sampling, shows exactly one class
    besides background and void. Scored at full resolution against that class; void pixels are left
    out of Acc, IoU and AP (the boundary F-score compares whole masks, void as background).
Folder format (multi-concept confusion sets such as AnchorDiff's, which is not public)::

    DIR/<image id>/image.png        (or image.jpg / image.jpeg)
                   concepts.txt     one concept per line, in order (at least one)
                   mask_1.png       the mask of line 1 (grey or RGB; any non-zero pixel = the concept),
                   mask_2.png ...   one per concept, the image's size
                   prompt.txt       optional: the prompt to look at the image with

    Image folders are read in sorted name order. Every concept is a target: each is scored once
    against the others (AnchorDiff eq. 14) and against its whole image (binary protocol).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

# PascalVOC's 20 classes in label order (1..20), as one-word queries: a concept should be one CLIP
# token or a short phrase SD3 knows.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_QUERIES = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table",
    "dog", "horse", "motorcycle", "person", "plant", "sheep", "sofa", "train", "monitor",
)
VOC_SINGLE_CLASS_COUNT = 930  # ConceptAttention's split of the 1,449 val images
VOC_SELECTION_SIZE = (224, 224)

# Auxiliary concepts recorded next to the target (ConceptAttention's defaults; AnchorDiff Table 6
# reports them as nearly irrelevant to AnchorDiff, but ConceptAttention's softmax needs them).
IMAGENET_BACKGROUND = ("background", "floor", "tree", "person", "grass", "face")
VOC_BACKGROUND = ("background", "floor", "grass", "tree", "sky")


class DatasetError(ValueError):
    """The dataset files are missing or not in the expected format; the message says what to do."""


@dataclass(frozen=True)
class Sample:
    id: str  # unique in its dataset, safe as a file name
    image: np.ndarray  # [H, W, 3] uint8
    concepts: tuple[str, ...]  # recorded concepts: the targets first, then auxiliary ones
    masks: np.ndarray  # [T, H, W] bool, truth of the T targets
    valid: Optional[np.ndarray] = None  # [H, W] bool: pixels that are scored (None = all)
    prompt: Optional[str] = None  # the dataset's own prompt, if it has one

    @property
    def targets(self) -> tuple[str, ...]:
        return self.concepts[: self.masks.shape[0]]


def with_background(targets: Sequence[str], background: Sequence[str]) -> tuple[str, ...]:
    """Targets, then the auxiliary concepts that are not already targets."""
    return tuple(targets) + tuple(b for b in background if b not in targets)


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


# ----------------------------------------------------------------------------- ImageNet-Segmentation
def read_name_map(path) -> dict:
    """``--imagenet-names``: a JSON object from the image's WordNet synset (``"n02084071"``), or its
    full id (``"n02084071_1234"``), or its 0-based index in the file (``"17"``), to the concept to
    query (``"dog"``). The most specific key wins. ConceptAttention queried one simplified word per
    class (their ``imagenet_class_map.json`` maps each synset's first WordNet lemma to it)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"--imagenet-names: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"--imagenet-names: {path} is not valid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("categories"), dict) and len(data) == 1:
        data = data["categories"]
    if not isinstance(data, dict) or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise DatasetError(f"--imagenet-names: {path} must be a JSON object mapping ids to concept names, e.g. {{\"n02084071\": \"dog\"}}")
    return {str(k): v.strip() for k, v in data.items()}


def _matlab_string(dataset) -> str:
    return "".join(chr(int(c)) for c in np.asarray(dataset).ravel() if int(c) != 0)


def imagenet_segmentation(mat_path, names: dict, background: Sequence[str] = IMAGENET_BACKGROUND) -> Iterator[Sample]:
    """Samples of ``gtsegs_ijcv.mat`` (see the module docstring)."""
    try:
        import h5py
    except ImportError:
        raise DatasetError("Reading gtsegs_ijcv.mat (MATLAB v7.3 = HDF5) needs h5py: pip install h5py") from None
    mat_path = Path(mat_path)
    if not mat_path.is_file():
        raise DatasetError(f"{mat_path} does not exist: download gtsegs_ijcv.mat (ImageNet-Segmentation) and pass its path")
    try:
        f = h5py.File(mat_path, "r")
    except OSError as e:
        raise DatasetError(f"{mat_path} is not a MATLAB v7.3 (HDF5) file: {e}") from None
    with f:
        for key in ("/value/img", "/value/gt", "/value/id"):
            if key not in f:
                raise DatasetError(f"{mat_path} has no {key}: not ImageNet-Segmentation's gtsegs_ijcv.mat")
        count = f["/value/img"].shape[0]
        for i in range(count):
            ident = _matlab_string(f[f["/value/id"][i, 0]])
            synset = ident.split("_")[0]
            name = names.get(str(i)) or names.get(ident) or names.get(synset)
            if name is None:
                raise DatasetError(
                    f"--imagenet-names has no entry for image {i} ({ident}): add \"{synset}\": \"<class word>\" "
                    f"(its WordNet synset) to the JSON file"
                )
            image = np.asarray(f[f["/value/img"][i, 0]]).T  # MATLAB column-major: [3, W, H] -> [H, W, 3]
            if image.ndim == 2:  # a grey image
                image = np.repeat(image[..., None], 3, axis=2)
            gt = np.asarray(f[f[f["/value/gt"][i, 0]][0, 0]]).transpose(1, 0) > 0
            if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != gt.shape:
                raise DatasetError(f"{mat_path}: image {i} ({ident}) has shape {image.shape} but its mask {gt.shape}")
            yield Sample(f"{i:05d}_{_safe_id(ident)}", np.ascontiguousarray(image.astype(np.uint8)),
                         with_background([name], background), gt[None])


def imagenet_count(mat_path) -> int:
    import h5py

    with h5py.File(mat_path, "r") as f:
        return int(f["/value/img"].shape[0])


# ----------------------------------------------------------------------------- PascalVOC 2012
def voc_root(path) -> Path:
    """The VOC2012 folder: `path` itself or `path`/VOC2012 or `path`/VOCdevkit/VOC2012."""
    path = Path(path)
    for candidate in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise DatasetError(
        f"{path} is not a PascalVOC 2012 folder: expected ImageSets/Segmentation/, JPEGImages/ and "
        "SegmentationClass/ in it (or in VOC2012/ or VOCdevkit/VOC2012/ below it)"
    )


def _voc_labels(png: Path) -> Image.Image:
    label = Image.open(png)
    if label.mode not in ("P", "L"):
        raise DatasetError(f"{png} is a {label.mode} image: SegmentationClass masks must be VOC's palette (class index) PNGs")
    return label


def voc_single_class_ids(root, split: str = "val") -> list[tuple[str, int]]:
    """(image id, class 1..20) of the single-class images of `split`, in the split file's order."""
    root = voc_root(root)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(f"{split_file} does not exist (the split names are train, val, trainval)")
    out = []
    for ident in split_file.read_text().split():
        png = root / "SegmentationClass" / f"{ident}.png"
        if not png.is_file():
            raise DatasetError(f"{png} is missing: the split lists {ident}")
        small = np.asarray(_voc_labels(png).resize(VOC_SELECTION_SIZE[::-1], Image.NEAREST))
        classes = sorted(set(np.unique(small).tolist()) - {0, 255})
        if len(classes) == 1:
            if not 1 <= classes[0] <= len(VOC_CLASSES):
                raise DatasetError(f"{png} has label {classes[0]}; VOC labels are 0..20 and 255")
            out.append((ident, classes[0]))
    return out


def voc_single_class(root, split: str = "val", background: Sequence[str] = VOC_BACKGROUND,
                     queries: Sequence[str] = VOC_QUERIES, ids: Optional[list] = None) -> Iterator[Sample]:
    root = voc_root(root)
    for ident, label in (ids if ids is not None else voc_single_class_ids(root, split)):
        labels = np.asarray(_voc_labels(root / "SegmentationClass" / f"{ident}.png"))
        jpg = root / "JPEGImages" / f"{ident}.jpg"
        if not jpg.is_file():
            raise DatasetError(f"{jpg} is missing")
        image = np.asarray(Image.open(jpg).convert("RGB"))
        if image.shape[:2] != labels.shape:
            raise DatasetError(f"{jpg} is {image.shape[:2]} but its mask {labels.shape}")
        yield Sample(_safe_id(ident), image, with_background([queries[label - 1]], background),
                     (labels == label)[None], valid=labels != 255)


# ----------------------------------------------------------------------------- folder format
IMAGE_NAMES = ("image.png", "image.jpg", "image.jpeg")


def folder_items(root) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder (the folder format: DIR/<image id>/image.png, concepts.txt, mask_1.png ...)")
    items = sorted(p for p in root.iterdir() if p.is_dir())
    if not items:
        raise DatasetError(f"{root} has no image folders: expected DIR/<image id>/image.png, concepts.txt, mask_1.png ...")
    return items


def folder_dataset(root, background: Sequence[str] = ()) -> Iterator[Sample]:
    """Samples of the folder format (see the module docstring)."""
    for item in folder_items(root):
        image_path = next((item / n for n in IMAGE_NAMES if (item / n).is_file()), None)
        if image_path is None:
            raise DatasetError(f"{item} has no image ({' / '.join(IMAGE_NAMES)})")
        concepts_file = item / "concepts.txt"
        if not concepts_file.is_file():
            raise DatasetError(f"{item} has no concepts.txt (one concept per line)")
        concepts = [line.strip() for line in concepts_file.read_text().splitlines() if line.strip()]
        if not concepts:
            raise DatasetError(f"{concepts_file} lists no concept")
        image = np.asarray(Image.open(image_path).convert("RGB"))
        masks = []
        for k, concept in enumerate(concepts, start=1):
            mask_path = item / f"mask_{k}.png"
            if not mask_path.is_file():
                raise DatasetError(f"{item} has no mask_{k}.png for concept {k} ('{concept}')")
            mask = np.asarray(Image.open(mask_path))
            mask = mask.any(axis=2) if mask.ndim == 3 else mask != 0
            if mask.shape != image.shape[:2]:
                raise DatasetError(f"{mask_path} is {mask.shape} but the image is {image.shape[:2]}")
            masks.append(mask)
        prompt_file = item / "prompt.txt"
        prompt = prompt_file.read_text().strip() if prompt_file.is_file() else None
        yield Sample(_safe_id(item.name), image, with_background(concepts, background), np.stack(masks), prompt=prompt or None)
