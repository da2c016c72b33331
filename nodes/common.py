"""Shared bits of the node classes: socket types, progress, previews, layer lists."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

import comfy.model_management
import comfy.utils
import dataclasses

from comfy_api.latest import io, ui

from ..anchordiff_core.concepts import concept_index, concept_number
from ..anchordiff_core.maps import AttentionMaps
from . import preview
from .errors import AnchorDiffError, parse_layers

CATEGORY = "AnchorDiff"
MAPS_TIP = "From 'AnchorDiff Read Maps' or 'AnchorDiff Look At Image'."
BASELINE_CATEGORY = "AnchorDiff/baselines"

Concepts = io.Custom("ANCHORDIFF_CONCEPTS")
Recorder = io.Custom("ANCHORDIFF_RECORDER")
Maps = io.Custom("ANCHORDIFF_MAPS")
Anchors = io.Custom("ANCHORDIFF_ANCHORS")
Graph = io.Custom("ANCHORDIFF_GRAPH")
Heat = io.Custom("ANCHORDIFF_HEAT")


def user_errors(call, *args, **kwargs):
    """Core ValueErrors are already worded for users: re-raise them as AnchorDiff errors."""
    try:
        return call(*args, **kwargs)
    except AnchorDiffError:
        raise
    except ValueError as error:
        raise AnchorDiffError(str(error)) from None


def finite_inputs(cls, **values) -> None:
    """Refuse NaN and +-inf in the FLOAT inputs `values` of node `cls`, naming the input and the
    range its schema allows (ComfyUI's own min/max checks let NaN through: NaN < min is false)."""
    schema = cls.define_schema()
    for name, value in values.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            continue
        spec = next(i for i in schema.inputs if i.id == name)
        raise AnchorDiffError(
            f"{name} is {value!r} in {schema.display_name}: it needs a finite number from {spec.min:g} to {spec.max:g} "
            f"(default {spec.default:g}). Type a number there (a workflow file must not hold NaN or Infinity)."
        )


def progress_callback(total: int):
    """(done, total) callback that moves a ComfyUI progress bar and honours interruption."""
    bar = comfy.utils.ProgressBar(total)

    def callback(done: int, _total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return callback


def parse_block_list(text: str, maps: AttentionMaps, what: str = "layers") -> tuple[int, ...]:
    """'9, 18' -> (9, 18) checked against the recorded model; '' -> () meaning the default."""
    return parse_layers(text, maps.num_blocks, what, "the recorded model")


def check_image(image: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    """The optional preview IMAGE, if it fits the recorded batch (any size: it is only a backdrop)."""
    if image is None:
        return None
    if image.dim() != 4 or image.shape[0] not in (1, batch):
        raise AnchorDiffError(f"The preview image batch ({image.shape[0]}) does not match the {batch} recorded image(s).")
    return image


# The ui key of our preview pictures (ComfyUI temp images, as `ui.PreviewImage` saves them). Not
# `images`: every frontend draws a node's `images` itself (the classic canvas under the widgets,
# Nodes 2.0 under the node, and 1.32.9's Nodes 2.0 gives a node no way to opt out), so our
# pictures would show twice. Only web/anchordiff.js draws this key; /history keeps it like any
# other (anchordiff_client downloads every file an output names).
PREVIEW_KEY = "anchordiff_images"


# Schema flags of the nodes with a preview: ComfyUI 0.33 resends a node's cached ui (our previews)
# at every run when its schema has `has_intermediate_output` (without making it an output node);
# older ComfyUI (0.3.75) has no such flag, so there a run answered from the cache shows no preview
# (web/anchordiff.js restores the newest stored one after a page reload). The hidden inputs give the
# node the queued prompt and its id in it, for `made_from`.
PREVIEW_SCHEMA = {
    **({"has_intermediate_output": True} if "has_intermediate_output" in getattr(io.Schema, "__dataclass_fields__", {}) else {}),
    "hidden": [io.Hidden.prompt, io.Hidden.unique_id],
}


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def made_from(prompt, node_id) -> Optional[dict]:
    """The part of a queued API prompt a node's output depends on: the node and every node upstream of
    it, as {id: {"class_type", "inputs"}} (titles left out); None where the node is not in it (a node
    made by a node expansion) or no prompt is known (a node called outside ComfyUI's executor).
    web/anchordiff.js shows a stored preview (a tab shown again, a page reload) only where the graph
    would queue exactly this again (its promptSource), else none: never another run's picture."""
    if not isinstance(prompt, dict) or node_id is None or str(node_id) not in prompt:
        return None
    found, todo = {}, [str(node_id)]
    while todo:
        key = todo.pop()
        if key in found or key not in prompt:
            continue
        node = prompt[key]
        inputs = node.get("inputs", {})
        found[key] = {"class_type": node.get("class_type"), "inputs": inputs}
        todo.extend(value[0] for value in inputs.values() if _is_link(value))
    return found


def preview_ui(cls, images: list[torch.Tensor], info: dict) -> dict:
    """ui dict: the preview images (under PREVIEW_KEY) plus layout info for the web extension, with
    the node's id and the part of the prompt the preview was made from (`made_from`)."""
    saved = ui.PreviewImage(torch.cat(images, dim=0), cls=cls).as_dict()
    hidden = getattr(cls, "hidden", None)
    node_id = getattr(hidden, "unique_id", None)
    source = {"node_id": None if node_id is None else str(node_id), "made_from": made_from(getattr(hidden, "prompt", None), node_id)}
    return {PREVIEW_KEY: saved["images"], "anchordiff": [{**info, **source}]}


def heat_preview(cls, soft: torch.Tensor, names, image_size, image=None, points=None, manual=None) -> dict:
    """Preview of [B, K, H, W] soft maps: one row of concept panels per image."""
    pictures = []
    for b in range(soft.shape[0]):
        backdrop = None if image is None else image[min(b, image.shape[0] - 1)]
        pictures.append(preview.heat_panels(soft[b], names, backdrop, points[b] if points else None, manual))
    return preview_ui(cls, pictures, preview.layout(names, image_size, len(names), manual or ()))


_SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)} if dataclasses.is_dataclass(io.Schema) else set()


def search_aliases(*names: str) -> dict:
    """io.Schema keyword for names the node search also matches (the design card's plain names, next
    to the AnchorDiff-prefixed display names); ComfyUI before 0.4 has no such field, and gets none."""
    return {"search_aliases": list(names)} if "search_aliases" in _SCHEMA_FIELDS else {}


def pick_concepts(concepts: Sequence[str], concept: str) -> list[int]:
    """The recorded concepts a node's `concept` input names: empty -> all of them (in order), a number
    -> that one (1 = first), else the one of that name (`concept_index`); anything else is an
    AnchorDiffError that lists the concepts. The Mask node outputs every picked concept; Points and
    Boxes cuts the first."""
    text = (concept or "").strip()
    if not text:
        return list(range(len(concepts)))
    number = concept_number(text)
    if number is not None:
        index = number - 1
        if not 0 <= index < len(concepts):
            raise AnchorDiffError(f"concept {text} does not exist: there are {len(concepts)} concepts ({', '.join(concepts)}).")
        return [index]
    index = concept_index(concepts, text)
    if index < 0:
        raise AnchorDiffError(f"Unknown concept '{text}'; the recorded concepts are: {', '.join(concepts)}.")
    return [index]


USED_WHEN = "anchordiff_used_when"  # the input option web/anchordiff.js reads


def used_when(widget_input, **conditions):
    """A widget input that is read only when other widgets of its node have some values, e.g.
    used_when(io.Int.Input("steps", ...), steps_setting=["custom"]): every condition must hold.
    The frontend greys the widget out otherwise (web/anchordiff.js); its value is kept and saved.
    Set after construction: 0.3.75's Int / Float inputs take no extra_dict argument."""
    widget_input.extra_dict = {**(getattr(widget_input, "extra_dict", None) or {}), USED_WHEN: conditions}
    return widget_input
