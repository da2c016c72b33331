"""python -m anchordiff_eval: the AnchorDiff paper's evaluation on a local SD3 / SD3.5 model.

    python -m anchordiff_eval --comfyui ~/ComfyUI \\
        --checkpoint ~/ComfyUI/models/checkpoints/sd3_medium_incl_clips_t5xxlfp16.safetensors \\
        --imagenet-seg gtsegs_ijcv.mat --imagenet-names imagenet_names.json \\
        --voc ~/data/VOCdevkit/VOC2012 --folder ~/data/confusion_set --out results/sd3m

See docs/EVALUATION.md. Exit status 0 on success, 2 on bad input (the message says what to fix).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from anchordiff_core import auto
from anchordiff_core.masks import EDGE_EPS, EDGE_RADIUS
from anchordiff_core.metrics import nan_to_none

from . import datasets as ds
from .comfy import ANCHOR_FROM, NodeRecorder, RecordOptions, SetupError, load_comfyui, load_models
from .run import DatasetRun, Settings, check_settings, evaluate_dataset, format_markdown

ALL_METHODS = NodeRecorder.METHODS


def _concept_list(text: str | None, default):
    if text is None:
        return tuple(default)
    return tuple(part.strip() for part in text.replace("\n", ",").split(",") if part.strip())


def _setting(kind):
    """argparse type: "auto", "paper" (kept as names, resolved per image size by anchordiff_core.auto) or a number."""
    def parse(text: str):
        key = text.strip().lower()
        if key in (auto.AUTO, auto.PAPER):
            return key
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'auto', 'paper' or a {'whole ' if kind is int else ''}number; got '{text}'")
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m anchordiff_eval",
        description="Run AnchorDiff's evaluation (ImageNet-Segmentation, PascalVOC 2012 single-class, multi-concept "
        "confusion folders) on a local SD3 / SD3.5 model, through the same ComfyUI code the nodes use.",
    )
    g = p.add_argument_group("ComfyUI and the model")
    g.add_argument("--comfyui", required=True, help="your ComfyUI folder (the one with main.py); it is imported in this process")
    g.add_argument("--checkpoint", help="a full checkpoint (as 'Load Checkpoint' reads it), e.g. sd3_medium_incl_clips_t5xxlfp16.safetensors")
    g.add_argument("--unet", help="a diffusion model file instead (as 'Load Diffusion Model'), e.g. sd3.5_large.safetensors")
    g.add_argument("--text-encoders", nargs="+", default=(), metavar="FILE",
                   help="SD3's text encoders when the model file has none (SD3.5): clip_l, clip_g [, t5xxl]")
    g.add_argument("--vae", help="SD3's VAE file when the model file has none")
    g.add_argument("--clip-from", metavar="MODULE:FUNCTION", help="use the CLIP this function returns (tests, custom loaders)")
    g.add_argument("--vae-from", metavar="MODULE:FUNCTION", help="use the VAE this function returns (tests, custom loaders)")
    g.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU")

    g = p.add_argument_group("datasets (at least one)")
    g.add_argument("--imagenet-seg", metavar="MAT", help="ImageNet-Segmentation's gtsegs_ijcv.mat")
    g.add_argument("--imagenet-names", metavar="JSON", help="the concept to query per image: {\"n02084071\": \"dog\", ...} (synset, full id or index)")
    g.add_argument("--voc", metavar="DIR", help="PascalVOC 2012 (VOC2012/ or VOCdevkit/ above it); the 930 single-class val images")
    g.add_argument("--voc-split", default="val", help="VOC split to select single-class images from (default val)")
    g.add_argument("--folder", action="append", default=[], metavar="DIR",
                   help="a multi-concept set in the folder format (repeatable; see docs/EVALUATION.md)")
    g.add_argument("--background-concepts", default=None, metavar="LIST",
                   help="auxiliary concepts recorded next to the target (comma-separated; '' = none). Default: "
                   f"ImageNet {', '.join(ds.IMAGENET_BACKGROUND)}; VOC {', '.join(ds.VOC_BACKGROUND)} (ConceptAttention's); folders none")
    g.add_argument("--limit", type=int, default=None, help="only the first N images of each dataset")

    g = p.add_argument_group("protocol (defaults: the paper's; the nodes default to 'auto' gate and steps)")
    g.add_argument("--size", type=int, default=1024, help="images are resized to SIZE x SIZE (paper: 1024); a multiple of 16")
    g.add_argument("--prompt-template", default="a photo of {targets}",
                   help="prompt the model looks at each image with ({targets}, {concepts}); a folder's prompt.txt wins")
    g.add_argument("--record-at", type=float, default=0.5, help="noise level as a fraction of the trajectory (0.5 = midpoint)")
    g.add_argument("--seed", type=int, default=0, help="seed of the added noise")
    g.add_argument("--graph-layers", default="", help="joint blocks for the graph, e.g. '9, 18' (default: the model's)")
    g.add_argument("--seg4diff-layer", type=int, default=-1)
    g.add_argument("--gate-percentile", type=_setting(float), default=auto.PAPER_GATE_PERCENTILE,
                   help=f"gate: a percentile, 'paper' ({auto.PAPER_GATE_PERCENTILE:g}) or 'auto' (the nodes' default: sized to "
                   f"the image, {auto.PAPER_GATE_PERCENTILE:g} at 1024 px); default {auto.PAPER_GATE_PERCENTILE:g}")
    g.add_argument("--steps", type=_setting(int), default=auto.PAPER_STEPS,
                   help=f"propagation steps: a number, 'paper' ({auto.PAPER_STEPS}) or 'auto' (the nodes' default: "
                   f"{auto.STEPS_PER_SIDE:g} per token-grid side, {auto.PAPER_STEPS} at 1024 px); default {auto.PAPER_STEPS}")
    g.add_argument("--exclude-last-block", action="store_true", help="anchor selection without the pre_only last block")
    g.add_argument("--anchor-from", choices=tuple(ANCHOR_FROM), default="paper",
                   help="AnchorDiff's anchor: the paper's A_CI argmax, the consensus anchor (every block, both directions; "
                   "records every block's image-to-concept map too), or that anchor map smoothed over the token grid "
                   "(consensus-smoothed: Anchor Select's default)")
    g.add_argument("--anchor-regions", action="store_true",
                   help="the nodes' default multi-anchor and Propagate setting: up to 3 separated peaks of the anchor map "
                   "(at least 0.7 of the peak, 1/8 of the token grid's side apart), the heat kept only on the mask's regions "
                   "that hold an anchor (docs/DESIGN.md 'Anchor regions'); default: the paper's single anchor, heat everywhere")
    g.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {', '.join(ALL_METHODS)}")
    g.add_argument("--refine-edges", action="store_true", help="also score every method with the Mask node's refine_edges")
    g.add_argument("--edge-radius", type=int, default=EDGE_RADIUS)
    g.add_argument("--boundary-tolerance", type=int, default=None, help="BF tolerance in pixels (default DAVIS: ceil(0.008 * diagonal))")

    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="results folder: results.md, results.json, <dataset>/overlays/, <dataset>/cache/")
    g.add_argument("--restart", action="store_true", help="discard cached results in --out instead of resuming")
    g.add_argument("--no-overlays", action="store_true", help="skip the per-image overlay PNGs")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def datasets_from(args) -> list[DatasetRun]:
    runs = []
    if args.imagenet_seg:
        if not args.imagenet_names:
            raise ds.DatasetError(
                "gtsegs_ijcv.mat stores only WordNet ids: give --imagenet-names names.json mapping each synset to the "
                "word to query, e.g. {\"n02084071\": \"dog\"} (see docs/EVALUATION.md)"
            )
        names = ds.read_name_map(args.imagenet_names)
        background = _concept_list(args.background_concepts, ds.IMAGENET_BACKGROUND)
        runs.append(DatasetRun("imagenet-seg", "ImageNet-Segmentation",
                               ds.imagenet_segmentation(args.imagenet_seg, names, background), ds.imagenet_count(args.imagenet_seg),
                               [f"Auxiliary concepts: {', '.join(background) or 'none'}."]))
    if args.voc:
        ids = ds.voc_single_class_ids(args.voc, args.voc_split)
        background = _concept_list(args.background_concepts, ds.VOC_BACKGROUND)
        notes = [f"Auxiliary concepts: {', '.join(background) or 'none'}."]
        if args.voc_split == "val" and len(ids) != ds.VOC_SINGLE_CLASS_COUNT:
            notes.append(f"Note: {len(ids)} single-class images selected, not the paper's {ds.VOC_SINGLE_CLASS_COUNT} "
                         "(a subset of VOC 2012, or another release).")
        runs.append(DatasetRun(f"voc-{args.voc_split}-single", f"PascalVOC 2012 single-class ({args.voc_split})",
                               ds.voc_single_class(args.voc, args.voc_split, background, ids=ids), len(ids), notes))
    for folder in args.folder:
        items = ds.folder_items(folder)
        background = _concept_list(args.background_concepts, ())
        name = Path(folder).resolve().name
        runs.append(DatasetRun(f"folder-{name}", f"Multi-concept set '{name}'", ds.folder_dataset(folder, background), len(items),
                               [f"Auxiliary concepts: {', '.join(background) or 'none'}."]))
    if not runs:
        raise ds.DatasetError("no dataset given: pass --imagenet-seg, --voc and/or --folder")
    return runs


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in ALL_METHODS]
        if unknown or not methods:
            raise SetupError(f"--methods: unknown {unknown}; choose from {', '.join(ALL_METHODS)}")
        if args.size <= 0 or args.size % 16:
            raise SetupError(f"--size {args.size} must be a positive multiple of 16 (SD3 tokens are 16 px)")
        runs = datasets_from(args)  # dataset errors before the model loads
        pack = load_comfyui(args.comfyui, args.cpu)
        models = load_models(args.checkpoint, args.unet, args.text_encoders, args.vae, args.clip_from, args.vae_from)
        options = RecordOptions(args.record_at, args.seed, args.graph_layers, args.seg4diff_layer, args.gate_percentile,
                                args.steps, args.exclude_last_block, args.anchor_from, args.anchor_regions)
        recorder = NodeRecorder(pack, models, options)
        settings = Settings(f"{recorder.variant}: {models.description}", args.size, args.prompt_template, methods,
                            {k: getattr(options, k) for k in options.__dataclass_fields__
                             if not (k == "anchor_from" and options.anchor_from == "paper")
                             and not (k == "anchor_regions" and not options.anchor_regions)})  # earlier caches stay valid
        out = Path(args.out)
        check_settings(out, settings, args.restart)
        results = {}
        for run in runs:
            results[run.key] = evaluate_dataset(run, recorder, settings, out, refine=args.refine_edges, edge_radius=args.edge_radius,
                                        edge_eps=EDGE_EPS, boundary_tolerance=args.boundary_tolerance,
                                        overlays=not args.no_overlays, limit=args.limit, progress=not args.no_progress)
    except (SetupError, ds.DatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = format_markdown(results, settings)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(nan_to_none({"settings": settings.__dict__, "datasets": results}), indent=2) + "\n")
    print(table)
    print(f"Wrote {out / 'results.md'}, {out / 'results.json'} and the per-image overlays in {out}/<dataset>/overlays/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
