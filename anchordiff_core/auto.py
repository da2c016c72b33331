"""The gate and step count for any token grid: "auto", exact at the paper's 64 x 64 tokens.

The paper set its 98th-percentile gate (2% of the N^2 pairs: 81.92 neighbours per token) and 160
propagation steps at 1024 x 1024 images, i.e. 64 x 64 tokens. A fixed percentile keeps a fixed
*fraction* of the pairs, so the number of neighbours per token shrinks with the image: ~5 at
16 x 16 tokens. The rule below is what the toy-world measurement supports (docs/DESIGN.md,
"Gate and steps at every size"; benchmarks/bench_sizes.py, benchmarks/results/sizes.md).

    gate_percentile_for("auto", (16, 16))   # the rule
    gate_percentile_for("paper", (16, 16))  # 98.0
    gate_percentile_for(95.0, (16, 16))     # 95.0 (a number passes through, checked)
"""
from __future__ import annotations

import math
from typing import Union

PAPER_GRID = (64, 64)
PAPER_GATE_PERCENTILE = 98.0
PAPER_STEPS = 160
AUTO, PAPER = "auto", "paper"
Setting = Union[str, float, int]


def _tokens(grid) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in grid)
        ok = (h, w) == tuple(grid)
    except (TypeError, ValueError):
        ok = False
    if not ok or h <= 0 or w <= 0:
        raise ValueError(f"grid must be two positive whole numbers (token rows, columns), e.g. (64, 64); got {grid!r}")
    return h, w


PAPER_NEIGHBOURS = (100.0 - PAPER_GATE_PERCENTILE) / 100.0 * PAPER_GRID[0] * PAPER_GRID[1]  # 81.92 per token
MAX_NEIGHBOUR_SHARE = 1 / 16   # never gate in more than 1/16 of the tokens (measured: a looser cap loses at 8 x 8)
STEPS_PER_SIDE = PAPER_STEPS / PAPER_GRID[0]                                                 # 2.5


def auto_gate_percentile(grid: tuple[int, int]) -> float:
    """Gate percentile for a token grid: keep the paper's 81.92 neighbours per token, but at most
    1/16 of the tokens.  = 100 - 8192 / N for N >= 1311 tokens (98.0 at 64 x 64 exactly, 99.11 at
    96 x 96), 93.75 below (~36 x 36 tokens, 576 px images, and smaller)."""
    h, w = _tokens(grid)
    n = h * w
    return max(100.0 - 100.0 * PAPER_NEIGHBOURS / n, 100.0 * (1.0 - MAX_NEIGHBOUR_SHARE))


def auto_steps(grid: tuple[int, int]) -> int:
    """Propagation steps for a token grid: 2.5 per grid side (sqrt of the token count), at least 1;
    160 at 64 x 64 exactly, 40 at 16 x 16, 240 at 96 x 96."""
    h, w = _tokens(grid)
    return max(1, round(STEPS_PER_SIDE * math.sqrt(h * w)))


ANCHOR_SEPARATION_SHARE = 1 / 8  # multi-anchor peaks at least 1/8 of the grid side apart: 8 tokens at 64 x 64


def auto_min_distance(grid: tuple[int, int]) -> float:
    """Multi-anchor separation in tokens for a token grid: 1/8 of the grid side (sqrt of the token
    count), 8 tokens (128 px) at the paper's 64 x 64, 4 at 32 x 32, 2 at 16 x 16. A fixed 8 tokens is
    half of a 256 px image: measured on the toy's validation split, it merges the instances there
    (docs/DESIGN.md, "Anchor regions")."""
    h, w = _tokens(grid)
    return ANCHOR_SEPARATION_SHARE * math.sqrt(h * w)


def _named(setting: Setting, grid: tuple[int, int], auto, paper, what: str):
    """"auto" -> auto(grid), "paper" -> paper; another string is an error naming `what`; else None."""
    if not isinstance(setting, str):
        return None
    key = setting.strip().lower()
    if key == AUTO:
        return auto(grid)
    if key == PAPER:
        return paper
    raise ValueError(f"{what}; got '{setting}'")


def gate_percentile_for(setting: Setting, grid: tuple[int, int]) -> float:
    """"auto" (the rule), "paper" (98.0) or a percentile in [0, 100] -> the gate percentile."""
    what = "gate percentile must be 'auto', 'paper' or a number from 0 to 100"
    named = _named(setting, grid, auto_gate_percentile, PAPER_GATE_PERCENTILE, what)
    if named is not None:
        return named
    if isinstance(setting, bool) or not isinstance(setting, (int, float)) or not 0.0 <= float(setting) <= 100.0:
        raise ValueError(f"{what}; got {setting!r}")
    return float(setting)


def min_distance_for(setting: Setting, grid: tuple[int, int]) -> float:
    """"auto" (the rule) or a finite distance >= 0 in tokens -> the multi-anchor separation."""
    what = "min_distance must be 'auto' or a number of tokens >= 0"
    if isinstance(setting, str):
        if setting.strip().lower() == AUTO:
            return auto_min_distance(grid)
        raise ValueError(f"{what}; got '{setting}'")
    if isinstance(setting, bool) or not isinstance(setting, (int, float)) or not 0.0 <= float(setting) < math.inf:
        raise ValueError(f"{what}; got {setting!r}")
    return float(setting)


def steps_for(setting: Setting, grid: tuple[int, int]) -> int:
    """"auto" (the rule), "paper" (160) or a whole number of steps >= 0 -> the step count."""
    what = "steps must be 'auto', 'paper' or a whole number >= 0"
    named = _named(setting, grid, auto_steps, PAPER_STEPS, what)
    if named is not None:
        return named
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"{what}; got {setting!r}")
    return setting
