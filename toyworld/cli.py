"""The command-line options every toy-world measurement shares: which scenes (`--scenes` of
`--split`), at what size, recorded at which point of the schedule. Used by
`python -m toyworld.grounding` and the benchmarks that run on the toy (bench_anchors, bench_quality);
each keeps its own defaults and adds its own options."""
from __future__ import annotations

import argparse
from typing import Optional

from .world import SPLITS


def scene_parser(description: str, *, scenes: int, record_at: float, record_at_help: Optional[str] = None) -> argparse.ArgumentParser:
    """A parser with --scenes, --split (default test), --size (default 256 px) and --record-at."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--scenes", type=int, default=scenes)
    p.add_argument("--split", default="test", choices=sorted(SPLITS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--record-at", type=float, default=record_at, help=record_at_help)
    return p


def scene_seeds(args: argparse.Namespace) -> range:
    """The seeds the parsed options name: the first --scenes of --split."""
    return SPLITS[args.split].seeds(args.scenes)
