"""The AnchorDiff paper's evaluation for users with SD3 / SD3.5 weights and the datasets:
``python -m anchordiff_eval --help`` (docs/EVALUATION.md).

Unlike ``anchordiff_core`` this package imports ComfyUI (from the folder the user gives), so the
masks it scores come from exactly the code the nodes run.
"""
