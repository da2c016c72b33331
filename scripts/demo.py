"""The README's demo: a real headless ComfyUI with this pack and a tiny SD3, one example workflow.

    bash scripts/demo.sh            # sets up .venv, then runs this
    .venv/bin/python scripts/demo.py [--workflow PATH] [--concepts "cat, sofa"] [--size 512] [--out DIR]

No real SD3 weights can be downloaded here, so the workflow's loaders are swapped for tiny
random-weight fixtures (tests/fixtures/substitute.py, documented in docs/TESTING.md); the
workflow itself is the file users open. The masks are therefore not meaningful pictures, but
every step (recording, anchors, gated graph, propagation, mask, inpainting) runs for real.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from anchordiff_client import prepare_prompt, run_prompt  # noqa: E402
from fixtures.comfy_base import link_anchordiff_pack, populate_base_dir  # noqa: E402
from fixtures.comfy_server import start_server, stop_server  # noqa: E402
from fixtures.substitute import substituted  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workflow", default=str(ROOT / "workflows" / "api" / "anchordiff-01-generate-mask-inpaint.json"))
    p.add_argument("--concepts", default=None, help="override the workflow's concepts, e.g. 'cat, sofa'")
    p.add_argument("--size", type=int, default=512, help="image size in pixels (the workflow says 1024; smaller is faster on a CPU)")
    p.add_argument("--steps", type=int, default=8, help="at most this many sampler steps")
    p.add_argument("--out", default=str(ROOT / "demo_output"))
    args = p.parse_args()

    prompt = json.loads(Path(args.workflow).read_text())
    with tempfile.TemporaryDirectory(prefix="anchordiff-demo-") as base:
        print(f"demo: building tiny models and a ComfyUI base directory in {base}")
        populate_base_dir(base)
        link_anchordiff_pack(base)
        t0 = time.monotonic()
        proc, url = start_server(base)
        print(f"demo: ComfyUI with AnchorDiff is up at {url} ({time.monotonic() - t0:.1f} s)")
        try:
            prompt = substituted(prompt, size=(args.size, args.size), max_steps=args.steps)
            prompt = prepare_prompt(prompt, concepts=args.concepts)
            result = run_prompt(prompt, server=url, output_dir=args.out, previews=False)
        finally:
            stop_server(proc)
    masks = [
        f for node_id, files in result.node_files.items() for f in files
        if "/mask_" in str(prompt[node_id]["inputs"].get("filename_prefix", ""))
    ]
    print(f"demo: {len(result.files)} file(s) in {args.out}, masks: " + ", ".join(Path(f).name for f in masks))
    return 0 if masks else 1


if __name__ == "__main__":
    sys.exit(main())
