"""AnchorDiff for ComfyUI: concept masks from SD3 / SD3.5 attention (V3 nodes).

Installed as a ComfyUI custom node (this folder in custom_nodes/); `anchordiff_core` is the
ComfyUI-free library underneath.
"""
import importlib.util

WEB_DIRECTORY = "./web"

# Outside ComfyUI (pytest collecting this folder, tools importing it) there is nothing to
# register; inside ComfyUI any import error of the nodes is raised, never hidden.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
