"""AnchorDiff core: pure-torch algorithm, baselines and evaluation metrics (no ComfyUI imports)."""
