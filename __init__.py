"""AnchorDiff for ComfyUI: concept masks from SD3 / SD3.5 attention (V3 nodes).

Installed as a ComfyUI custom node (this folder in custom_nodes/); `anchordiff_core` is the
ComfyUI-free library underneath.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
