"""The AnchorDiff chain over a batch of recorded images: the values that flow between the nodes.

    anchors = pick_anchors(maps)                 # Anchors   (per image [K, M] token indices)
    graphs  = build_graphs(maps)                 # Graphs    (per image sparse W_hat^T; gate "auto")
    heat    = propagate_anchors(graphs, anchors) # Heat      [B, K, N]  (steps "auto")
    masks   = heat_masks(heat)                   # [B, K, H, W]

Each value remembers which recording it came from, so values of different recordings are never
mixed silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .anchors import PIXELS_PER_TOKEN, anchor_smooth_sigma, consensus_map, point_to_token, select_anchors, smooth_on_grid
from .attention import mean_over_layers
from .auto import AUTO, Setting, gate_percentile_for, min_distance_for, steps_for
from .concepts import concept_index, concept_number
from .graph import GatedGraph, build_gated_graph
from .maps import AttentionMaps
from .masks import EDGE_EPS, EDGE_RADIUS, Threshold, refine_edges, soft_map, thresholds_for, to_mask
from .methods import baseline
from .propagation import anchor_regions, minmax_rows, propagate

Progress = Optional[Callable[[int, int], None]]


def recording_id(maps: AttentionMaps) -> str:
    return str(maps.meta.get("id", id(maps)))


@dataclass(frozen=True)
class Anchors:
    maps: AttentionMaps
    indices: tuple[torch.Tensor, ...]  # per image: LongTensor [K, M], -1 padded
    manual: tuple[bool, ...]  # per concept: placed by hand


@dataclass(frozen=True)
class Graphs:
    maps: AttentionMaps
    graphs: tuple[GatedGraph, ...]
    layers: tuple[int, ...]
    gate_percentile: Optional[float]


@dataclass(frozen=True)
class Heat:
    values: torch.Tensor  # [B, K, N] in [0, 1]
    grid: tuple[int, int]
    image_size: tuple[int, int]
    concepts: tuple[str, ...]
    method: str
    source: str
    anchors: Optional[tuple[torch.Tensor, ...]] = None


def anchor_layers(maps: AttentionMaps, exclude_last_block: bool = False) -> Optional[list[int]]:
    """Blocks whose A_CI anchor selection averages: all (paper), or all but the pre_only last one."""
    return list(range(maps.num_blocks - 1)) if exclude_last_block else None


# Where anchors come from: the paper's concept-to-image attention A_CI (concept queries, image keys),
# or image-to-concept attention (image queries over [image; prompt; concept] keys, read at the
# concept's columns: the map recorded at the Seg4Diff layer). The second is an option because on the
# toy SD3 trained here it localises far better (toyworld/README.md); the paper's is the default.
# "consensus" (issue 17): every recorded map of the concept but the last block's, A_CI per block and
# the image-to-concept map per block (maps.ic, recorded with RecordSpec.ic_blocks; without it the
# Seg4Diff layer's map), weighted by their agreement with each other (anchors.consensus_map):
# label-free.  The last (pre_only) block is always left out, in both directions: measured on the toy
# validation split, its maps pull the consensus off in both (docs/DESIGN.md "Consensus anchor").
# "consensus_smoothed": the consensus map blurred over the token grid (anchors.smooth_on_grid, sigma
# anchors.ANCHOR_SMOOTH_SHARE of the grid side) before its peak is taken: the anchor lands inside the
# region the maps agree on rather than on one edge token (docs/DESIGN.md "Consensus anchor", "Smoothed").
ANCHOR_SOURCES = ("concept_to_image", "image_to_concept", "consensus", "consensus_smoothed")
# Agreement weights squared (anchors.agreement_weights power): chosen on the toy validation split (phrase
# anchors +1.4 / +1.4 / +11.4 points over power 1 at 256 px record_at 0.85 / 0.5 and 512 px 0.85).
CONSENSUS_POWER = 2.0


def consensus_sources(maps: AttentionMaps) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The maps the consensus anchor pools, per image: A_CI [B, L, K, N] of every block but the last
    and the image-to-concept maps [B, L', K, N] of the same blocks when recorded (maps.ic), else the
    Seg4Diff layer's map when it is not the last block, else None."""
    blocks = list(range(max(maps.a_ci.shape[1] - 1, 1)))
    a_ci = maps.a_ci[:, blocks]
    if maps.ic is not None:
        return a_ci, maps.ic[:, blocks]
    if maps.seg4diff is not None and maps.seg4diff_layer in blocks:
        return a_ci, maps.seg4diff[:, None]
    return a_ci, None


def anchor_map(maps: AttentionMaps, exclude_last_block: bool = False, source: str = "concept_to_image") -> torch.Tensor:
    """The map anchors are the peaks of -> [B, K, N]: A_CI averaged over the anchor layers (the
    paper), the image-to-concept map of the Seg4Diff layer, or the consensus map (which always leaves
    the last block out: `exclude_last_block` does not change it), or that map smoothed over the grid."""
    if source == "consensus_smoothed":
        sigma = anchor_smooth_sigma(maps.grid)
        return torch.stack([smooth_on_grid(m, maps.grid, sigma) for m in anchor_map(maps, False, "consensus")])
    if source == "consensus":
        a_ci, ic = consensus_sources(maps)
        if a_ci.shape[1] + (0 if ic is None else ic.shape[1]) == 1:
            return a_ci[:, 0]  # one map (a one-block recording without image-to-concept maps): its own consensus
        return torch.stack([consensus_map(a_ci[b], None if ic is None else ic[b], CONSENSUS_POWER) for b in range(maps.batch_size)])
    if source == "image_to_concept":
        if maps.seg4diff is None:
            raise ValueError("This recording has no image-to-concept map: set the recorder's seg4diff_layer (-1 = default) and record again.")
        return maps.seg4diff
    if source != "concept_to_image":
        raise ValueError(f"anchor source must be one of {', '.join(ANCHOR_SOURCES)}; got '{source}'")
    return mean_over_layers(maps.a_ci, anchor_layers(maps, exclude_last_block), dim=1)


def parse_manual_points(text: str, concepts: Sequence[str]) -> dict[int, list[tuple[float, float]]]:
    """'cat: 512, 300' or '2: 100, 80', one point per line (or ';'): concept name or 1-based index."""
    points: dict[int, list[tuple[float, float]]] = {}
    for raw in (text or "").replace(";", "\n").splitlines():
        line = raw.strip()
        if not line:
            continue
        if ":" not in line:
            raise ValueError(f"manual anchor '{line}' must look like 'concept: x, y' (pixels), e.g. 'cat: 512, 300'")
        who, where = (part.strip() for part in line.rsplit(":", 1))
        number = concept_number(who)
        if number is not None:
            concept = number - 1
            if not 0 <= concept < len(concepts):
                raise ValueError(f"manual anchor '{line}': concept number {who} is not between 1 and {len(concepts)}")
        else:
            concept = concept_index(concepts, who)
        if concept < 0:
            raise ValueError(f"manual anchor '{line}': unknown concept '{who}'; the concepts are {', '.join(concepts)}")
        try:
            x, y = (float(v) for v in where.split(","))
        except ValueError:
            raise ValueError(f"manual anchor '{line}': the point must be two numbers 'x, y'") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"manual anchor '{line}': x and y must be finite numbers of pixels, e.g. 'cat: 512, 300'")
        points.setdefault(concept, []).append((x, y))
    return points


def pick_anchors(
    maps: AttentionMaps,
    max_anchors: int = 1,
    min_distance: Setting = 8.0,
    min_relative_score: float = 0.5,
    manual_points: str = "",
    exclude_last_block: bool = False,
    source: str = "concept_to_image",
) -> Anchors:
    """Automatic anchors (paper argmax, or several peaks), with manual points overriding concepts.
    `min_distance`: tokens, or "auto" (`auto.auto_min_distance`: 1/8 of the grid side)."""
    min_distance = min_distance_for(min_distance, maps.grid)
    a_ci = anchor_map(maps, exclude_last_block, source)
    manual = parse_manual_points(manual_points, maps.concepts)
    tokens = {
        c: [point_to_token(x, y, maps.image_size, maps.grid) for x, y in pts] for c, pts in manual.items()
    }
    width = max([max_anchors] + [len(t) for t in tokens.values()])
    per_image = []
    for b in range(maps.batch_size):
        auto = select_anchors(a_ci[b], max_anchors, min_distance, min_relative_score, maps.grid).view(len(maps.concepts), -1)
        chosen = torch.full((len(maps.concepts), width), -1, dtype=torch.long)
        chosen[:, : auto.shape[1]] = auto.cpu()
        for c, idx in tokens.items():
            chosen[c] = -1
            chosen[c, : len(idx)] = torch.tensor(idx)
        per_image.append(chosen)
    return Anchors(maps, tuple(per_image), tuple(c in tokens for c in range(len(maps.concepts))))


def build_graphs(
    maps: AttentionMaps,
    gate_percentile: Optional[Setting] = AUTO,
    layers: Sequence[int] = (),
    device=None,
    progress: Progress = None,
    interrupt: Optional[Callable[[], None]] = None,
) -> Graphs:
    """One gated graph per image, from A_II / O_II averaged over `layers` (default: all recorded),
    built on `device` (default: where the maps are; the graph is fastest on the accelerator).
    `gate_percentile`: "auto" (for the recording's token grid, `auto.auto_gate_percentile`), "paper"
    (98), a percentile, or None (no gate).
    `interrupt()` runs between chunks of each graph's work and may raise to stop."""
    chosen = tuple(layers) if layers else maps.graph_layers
    gate_percentile = None if gate_percentile is None else gate_percentile_for(gate_percentile, maps.grid)
    device = maps.a_ii.device if device is None else torch.device(device)
    graphs = []
    for b in range(maps.batch_size):
        a_layers, o_layers = maps.graph_inputs(b, chosen)
        graphs.append(build_gated_graph(a_layers, o_layers, gate_percentile, interrupt, device))
        if progress is not None:
            progress(b + 1, maps.batch_size)
    return Graphs(maps, tuple(graphs), chosen, gate_percentile)


KEEP = ("everywhere", "anchor_regions")  # where the heat is kept: the paper's, or propagation.anchor_regions


def propagate_anchors(graphs: Graphs, anchors: Anchors, steps: Setting = AUTO, progress: Progress = None,
                      keep: str = "everywhere") -> Heat:
    """Propagate every image's anchors over its graph; all concepts of an image in one batch.
    `steps`: "auto" (for the token grid, `auto.auto_steps`), "paper" (160) or a number.
    `keep`: "everywhere" (the paper) or "anchor_regions" (only the mask's regions that hold an anchor,
    `propagation.anchor_regions`)."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {', '.join(KEEP)}; got {keep!r}")
    if recording_id(graphs.maps) != recording_id(anchors.maps):
        raise ValueError("The graph and the anchors come from different recordings; connect both to the same maps.")
    maps = graphs.maps
    steps = steps_for(steps, maps.grid)
    total = maps.batch_size * max(steps, 1)
    out = []
    for b, graph in enumerate(graphs.graphs):
        def step_progress(done, _total, b=b):
            if progress is not None:
                progress(b * max(steps, 1) + done, total)

        heat = propagate(graph, anchors.indices[b].to(graph.device), steps, callback=step_progress)
        if keep == "anchor_regions":
            heat = anchor_regions(heat, anchors.indices[b], maps.grid)
        out.append(heat.cpu())
    return Heat(torch.stack(out), maps.grid, maps.image_size, maps.concepts, "anchordiff", recording_id(maps), anchors.indices)


def baseline_heat(maps: AttentionMaps, method: str, layers: Sequence[int] = (), softmax: bool = True) -> Heat:
    """Heat of a published baseline (`methods.BASELINES`: "cross_attention", "conceptattention",
    "seg4diff"). (The cross-attention heat over `anchor_layers` is also what anchor selection looks at.)"""
    chosen = list(layers) if layers else None
    spec = baseline(method)
    if spec.needs is not None and getattr(maps, spec.needs) is None:
        raise ValueError(spec.missing)
    values = [spec.heat(maps, b, chosen, softmax) for b in range(maps.batch_size)]
    return Heat(torch.stack(values).cpu(), maps.grid, maps.image_size, maps.concepts, method, recording_id(maps))


def consensus_heat(maps: AttentionMaps, source: str = "consensus") -> Heat:
    """The consensus anchor map ("consensus", or smoothed: "consensus_smoothed"; min-max per concept) as
    heat: what that anchor is the peak of."""
    if source not in ("consensus", "consensus_smoothed"):
        raise ValueError(f"source must be consensus or consensus_smoothed; got '{source}'")
    values = minmax_rows(anchor_map(maps, False, source).flatten(0, 1).float()).view(maps.a_ci.shape[0], len(maps.concepts), -1)
    return Heat(values.cpu(), maps.grid, maps.image_size, maps.concepts, source, recording_id(maps))


def heat_masks(
    heat: Heat,
    threshold: Threshold = "mean",
    soft: bool = False,
    image: Optional[torch.Tensor] = None,
    edge_radius: int = EDGE_RADIUS,
    edge_eps: float = EDGE_EPS,
) -> torch.Tensor:
    """[B, K, H, W] float32 at image resolution (the token grid's padding cropped away).

    With `image` (IMAGE [B or 1, H, W, C] at the recorded image size) the soft maps are first refined
    along the image's edges (`masks.refine_edges`), then thresholded as usual."""
    h, w = heat.grid
    padded = (h * PIXELS_PER_TOKEN, w * PIXELS_PER_TOKEN)
    if image is None:
        convert = (lambda v: soft_map(v, heat.grid, padded, heat.image_size)) if soft else (
            lambda v: to_mask(v, heat.grid, padded, threshold, heat.image_size)
        )
        return torch.stack([convert(v) for v in heat.values])
    if image.dim() != 4 or image.shape[0] not in (1, heat.values.shape[0]):
        raise ValueError(f"the image batch {tuple(image.shape)} does not match the {heat.values.shape[0]} recorded image(s)")
    out = []
    for b, v in enumerate(heat.values):
        maps = refine_edges(soft_map(v, heat.grid, padded, heat.image_size), image[min(b, image.shape[0] - 1)], edge_radius, edge_eps)
        out.append(maps if soft else (maps > thresholds_for(maps, threshold).view(-1, 1, 1)).float())
    return torch.stack(out)

