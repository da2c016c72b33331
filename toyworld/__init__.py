"""toyworld: a procedural world of shapes with exact masks, and the toy SD3 trained on it.

Not part of the algorithm (`anchordiff_core`): a test instrument that gives the project a model
whose attention means something, and ground truth to measure masks against. See toyworld/README.md.
"""
from .world import BACKGROUNDS, COLOURS, KIND_WEIGHTS, LOOKALIKE_PAIRS, SHAPES, SPLITS, Concept, Scene, make_scene

__all__ = ["BACKGROUNDS", "COLOURS", "KIND_WEIGHTS", "LOOKALIKE_PAIRS", "SHAPES", "SPLITS", "Concept", "Scene", "make_scene"]
