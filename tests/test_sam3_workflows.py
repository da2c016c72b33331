"""The SAM3 example workflows (AnchorDiff chooses, ComfyUI's SAM3 cuts or tracks) against a real
ComfyUI 0.33.0 server. SAM3's weights are not here, so the workflows are not run: every model file
and the video are placeholders, and the server's own validation (POST /prompt: node types, widget
values, and every link's type against the input it feeds) must accept each workflow as it is and
refuse it with a link re-pointed to an output of another type. What SAM3's code makes of what
AnchorDiff emits is tested in tests/test_segmenter_prompts.py."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fixtures.comfy_base import link_anchordiff_pack
from fixtures.comfy_server import get_json, post_json, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
SAM3_WORKFLOWS = sorted(p.stem for p in (ROOT / "workflows").glob("*.json")
                        if any(n["type"].startswith("SAM3_") for n in json.loads(p.read_text(encoding="utf-8"))["nodes"]))
MODEL_INPUTS = {"ckpt_name": "checkpoints", "clip_name1": "text_encoders", "clip_name2": "text_encoders", "clip_name3": "text_encoders"}
LOADERS = {"CheckpointLoaderSimple", "TripleCLIPLoader", "LoadVideo", "GetVideoComponents"}


def api(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from toyworld.comfy_env import comfyui_dir
    if not (comfyui_dir() / "comfy_extras" / "nodes_sam3.py").exists():
        pytest.skip("SAM3 is in ComfyUI 0.33+ (CI runs this on .venv-comfy033)")
    base = tmp_path_factory.mktemp("comfy_sam3_base")
    for sub in ("input", "output", "temp", "user", "custom_nodes"):
        (base / sub).mkdir()
    for name in SAM3_WORKFLOWS:  # placeholder (empty) files under every name the workflows load
        for node in api(name).values():
            for key, value in node["inputs"].items():
                if key in MODEL_INPUTS:
                    path = base / "models" / MODEL_INPUTS[key] / value
                elif node["class_type"] == "LoadVideo" and key == "file":
                    path = base / "input" / value
                else:
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
    link_anchordiff_pack(base)
    proc, url = start_server(base)
    yield url
    stop_server(proc)


def wait_done(url: str, prompt_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = get_json(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("completed") is not None:
            return entry
        time.sleep(0.25)
    raise TimeoutError(prompt_id)


def test_there_are_two_sam3_workflows():
    assert SAM3_WORKFLOWS == ["anchordiff-06-lookalike-sam3-cut-inpaint", "anchordiff-07-first-frame-mask-sam3-video-track"]


@pytest.mark.parametrize("name", SAM3_WORKFLOWS)
def test_server_validates_the_workflow_and_only_the_missing_weights_stop_it(name, server):
    prompt = api(name)
    answer = post_json(server + "/prompt", {"prompt": prompt})  # a 400 (validation error) raises here
    assert answer.get("node_errors") == {}
    entry = wait_done(server, answer["prompt_id"])
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errors, entry["status"]
    assert errors[0]["node_type"] in LOADERS, errors[0]  # a placeholder file, not a wiring fault


# each AnchorDiff -> SAM3 link, and an output of another type to point it at instead
PLANTED = {
    "anchordiff-06-lookalike-sam3-cut-inpaint": [("SAM3_Detect", "positive_coords"), ("SAM3_Detect", "bboxes"),
                                                  ("SAM3_Detect", "negative_coords")],
    "anchordiff-07-first-frame-mask-sam3-video-track": [("SAM3_VideoTrack", "initial_mask")],
}


@pytest.mark.parametrize("name", SAM3_WORKFLOWS)
def test_server_refuses_a_link_of_the_wrong_type(name, server):
    """The validation above checks link types: each AnchorDiff -> SAM3 link re-pointed at another
    output of the same AnchorDiff node (or, for a one-output node, the image) is refused."""
    prompt = api(name)
    assert set(PLANTED) == set(SAM3_WORKFLOWS)
    for class_type, input_name in PLANTED[name]:
        node_id = next(k for k, v in prompt.items() if v["class_type"] == class_type)
        source, slot = prompt[node_id]["inputs"][input_name]
        assert prompt[source]["class_type"].startswith("AnchorDiff"), (input_name, prompt[source]["class_type"])
        bad = json.loads(json.dumps(prompt))
        if prompt[source]["class_type"] == "AnchorDiffSegmenterPrompts":
            wrong = {"positive_coords": 2, "negative_coords": 2, "bboxes": 0}[input_name]
            bad[node_id]["inputs"][input_name] = [source, wrong]
        else:
            bad[node_id]["inputs"][input_name] = prompt[source]["inputs"]["image"]  # IMAGE into MASK
        try:  # refused (400), or queued with the broken output's chain dropped and named in node_errors
            answer = post_json(server + "/prompt", {"prompt": bad})
        except RuntimeError as error:
            assert "400" in str(error) and "return_type_mismatch" in str(error), error
            continue
        wait_done(server, answer["prompt_id"])
        assert "return_type_mismatch" in json.dumps(answer["node_errors"]), (input_name, answer)
