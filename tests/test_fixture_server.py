"""The fixtures inside a real ComfyUI server: models listed, test node pack loaded."""
import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fixtures.comfy_base import populate_base_dir
    from fixtures.comfy_server import start_server, stop_server
    base = populate_base_dir(tmp_path_factory.mktemp("comfy_base"))
    proc, url = start_server(base)
    yield url
    stop_server(proc)


def test_server_offers_fixtures(server):
    from fixtures.comfy_server import get_json
    info = get_json(server + "/object_info")
    assert "AnchorDiffTestCLIP" in info  # test node pack loaded by ComfyUI's own loader
    assert info["AnchorDiffTestCLIP"]["output"] == ["CLIP"]
    unets = info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert {"tiny_sd3.safetensors", "tiny_sd35.safetensors", "tiny_sd35m.safetensors"} <= set(unets)
    assert "taesd3" in info["VAELoader"]["input"]["required"]["vae_name"][0]


def test_server_samples_with_fixtures(server):
    """A whole prompt: tiny SD3 + fixture CLIP + KSampler + taesd3 decode + SaveImage."""
    import json
    import time
    import urllib.request

    from fixtures.comfy_server import get_json
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "AnchorDiffTestCLIP", "inputs": {"t5": False}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a cat"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd3"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "fixture"}},
    }
    req = urllib.request.Request(server + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        prompt_id = json.load(r)["prompt_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        hist = get_json(f"{server}/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    entry = hist[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["9"]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith("fixture")
