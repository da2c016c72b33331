"""Regenerate workflows/api/<name>.json from the UI workflows workflows/<name>.json.

    .venv-comfy033/bin/python -m scripts.sync_workflows            # rewrite the API files
    .venv-comfy033/bin/python -m scripts.sync_workflows --check    # exit 1 if any API file is stale

(from the repository root)

The UI files are the source: edit a workflow in ComfyUI, export it over workflows/<name>.json
(Workflow > Export), then run this. The node definitions come from GET /object_info of a real
ComfyUI server with this pack loaded: a throwaway test server of the venv's ComfyUI (0.33.0 in
.venv-comfy033, from scripts/setup_comfy033.sh), or --server URL for one you run (it must have this
pack installed). The files are made with the newest ComfyUI we test (SYNC_COMFYUI in
tests/fixtures/workflow_format.py): older ones ignore the inputs they lack, so one file serves both.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file, the repository's packages are not importable
    sys.exit("run this from the repository root as a module: python -m scripts.sync_workflows")

ROOT = Path(__file__).resolve().parents[1]

from tests.fixtures.workflow_format import SYNC_COMFYUI, api_path_for, dump, ui_to_api  # noqa: E402

import json  # noqa: E402


def ui_files() -> list[Path]:
    return sorted((ROOT / "workflows").glob("*.json"))


def object_info(server: str | None) -> dict:
    from tests.fixtures.comfy_server import start_server, stop_server
    if server:
        return checked_object_info(server.rstrip("/"))
    from tests.fixtures.comfy_base import link_anchordiff_pack, populate_base_dir
    with tempfile.TemporaryDirectory(prefix="anchordiff-sync-") as base:
        populate_base_dir(base)
        link_anchordiff_pack(base)
        proc, url = start_server(base)
        try:
            return checked_object_info(url)
        finally:
            stop_server(proc)


def checked_object_info(url: str) -> dict:
    from tests.fixtures.comfy_server import get_json
    version = get_json(url + "/system_stats")["system"]["comfyui_version"]
    if version != SYNC_COMFYUI:
        sys.exit(f"sync_workflows: the server runs ComfyUI {version}; the API files are made with {SYNC_COMFYUI}. "
                 "Run this with .venv-comfy033/bin/python (scripts/setup_comfy033.sh), or --server a "
                 f"ComfyUI {SYNC_COMFYUI} with this pack.")
    return get_json(url + "/object_info")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale or missing API files")
    parser.add_argument("--server", help="URL of a running ComfyUI with this pack (default: start a test server)")
    args = parser.parse_args(argv)
    info = object_info(args.server)
    stale = []
    for ui in ui_files():
        text = dump(ui_to_api(json.loads(ui.read_text(encoding="utf-8")), info))
        target = api_path_for(ui)
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        stale.append(target)
        if not args.check:
            target.parent.mkdir(exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(ROOT)}")
    orphans = [p for p in sorted((ROOT / "workflows" / "api").glob("*.json"))
               if not (ROOT / "workflows" / p.name).exists()]
    for path in orphans:
        print(f"API file without a UI workflow: {path.relative_to(ROOT)}", file=sys.stderr)
    if args.check and stale:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)}", file=sys.stderr)
    return 1 if orphans or (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
