"""anchordiff_client without a server: workflow files, overrides, error texts.
(tests/test_server.py runs it against a real ComfyUI.)"""
import json
import subprocess
import sys

import pytest

import anchordiff_client as cc

PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 4, "denoise": 1.0, "model": ["4", 0]}},
    "4": {"class_type": "UNETLoader", "inputs": {"unet_name": "sd3.safetensors"}, "_meta": {"title": "Load Diffusion Model"}},
    "5": {"class_type": "AnchorDiffConcepts", "inputs": {"concepts": "cat, dog"}, "_meta": {"title": "AnchorDiff Concepts"}},
    "6": {"class_type": "AnchorDiffAnchorSelect", "inputs": {"exclude_last_block": False}, "_meta": {"title": "Anchor Select"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a"}},
    "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "b"}},
}


def prepared(*sets, **kwargs):
    return cc.prepare_prompt(PROMPT, sets, **kwargs)


def test_set_by_id_title_and_class_with_the_replaced_type():
    p = prepared("3.seed=7", "AnchorDiff Concepts.concepts=cat, dog, tree", "KSampler.cfg=4.5",
                 "Anchor Select.exclude_last_block=true", "Load Diffusion Model.unet_name=sd3.5.safetensors")
    assert p["3"]["inputs"]["seed"] == 7 and p["3"]["inputs"]["cfg"] == 4.5
    assert p["5"]["inputs"]["concepts"] == "cat, dog, tree"  # '=' and ',' inside the value are kept
    assert p["6"]["inputs"]["exclude_last_block"] is True
    assert p["4"]["inputs"]["unet_name"] == "sd3.5.safetensors"
    assert PROMPT["3"]["inputs"]["seed"] == 1  # the original is untouched


def test_convenience_flags():
    p = prepared(concepts="car", seed=9)
    assert p["5"]["inputs"]["concepts"] == "car" and p["3"]["inputs"]["seed"] == 9


@pytest.mark.parametrize("assignment, message", [
    ("CLIPTextEncode.text=x", "matches nodes 7, 8"),
    ("3.model=x", "is connected to node 4"),
    ("3.steps=many", "needs an integer"),
    ("3.denoise=much", "needs a number"),
    ("Anchor Select.exclude_last_block=maybe", "needs true or false"),
    ("3.sampler=euler", "has no input 'sampler'"),
    ("Nope.seed=1", "no node 'Nope'"),
    ("3seed=1", "--set needs NODE.input=value"),
])
def test_bad_assignments_say_what_is_wrong(assignment, message):
    with pytest.raises(cc.ClientError, match=message):
        prepared(assignment)


def test_concepts_flag_needs_a_concepts_node():
    with pytest.raises(cc.ClientError, match="no 'AnchorDiff Concepts' node"):
        cc.prepare_prompt({"3": PROMPT["3"]}, concepts="cat")


def test_workflow_formats(tmp_path):
    api = tmp_path / "api.json"
    api.write_text(json.dumps(PROMPT))
    assert cc.load_workflow(api) == PROMPT
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"prompt": PROMPT}))
    assert cc.load_workflow(wrapped) == PROMPT
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [{"id": 1}], "links": [], "version": 0.4}))
    with pytest.raises(cc.ClientError, match=r"UI workflow .* needs the API format"):
        cc.load_workflow(ui)
    with pytest.raises(cc.ClientError, match="not an API-format prompt"):
        cc.check_api_prompt({"1": {"inputs": {}}})


def test_error_texts_are_comfyuis():
    rejected = cc.PromptRejected({
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": ""},
        "node_errors": {"4": {"errors": [{"message": "Value not in list", "details": "unet_name: 'x' not in []"}]}},
    }, PROMPT)
    assert str(rejected) == ("ComfyUI rejected the prompt: Prompt outputs failed validation\n"
                             "  node 4 (UNETLoader \"Load Diffusion Model\"): Value not in list: unet_name: 'x' not in []")
    failed = cc.ExecutionFailed({"node_id": "5", "exception_type": "x.y.AnchorDiffError", "exception_message": "No concepts given.\n"}, PROMPT)
    assert str(failed) == 'ComfyUI error in node 5 (AnchorDiffConcepts "AnchorDiff Concepts"): AnchorDiffError: No concepts given.'


def test_module_imports_neither_torch_nor_comfy():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('c', sys.argv[1]); "
            "m = sys.modules['c'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "bad = [n for n in sys.modules if n.split('.')[0] in ('torch', 'comfy', 'numpy')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, cc.__file__], check=True, timeout=60)


def test_unreachable_server_exits_4(tmp_path):
    api = tmp_path / "api.json"
    api.write_text(json.dumps(PROMPT))
    assert cc.main([str(api), "--server", "http://127.0.0.1:9", "-q"]) == 4


# ------------------------------------------------------------------------------ servers that are not ComfyUI
@pytest.fixture
def html_server():
    """A web server that is not ComfyUI: HTML pages for GET, 501 for POST."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!DOCTYPE html><html><head><title>Router</title></head><body>Welcome</body></html>"
            self.send_response(404 if self.path.startswith("/ws") else 200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("with_websocket", [True, False])
def test_a_server_that_is_not_comfyui_gets_one_clear_line(html_server, tmp_path, capsys, monkeypatch, with_websocket):
    if not with_websocket:
        monkeypatch.setattr(cc, "websocket", None)
    api = tmp_path / "api.json"
    api.write_text(json.dumps(PROMPT))
    assert cc.main([str(api), "--server", html_server, "-q"]) == 4
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {html_server} does not look like a ComfyUI server: ")
    assert "HTML page" in lines[0] and "<" not in lines[0] and "Content-Type" not in lines[0]


@pytest.mark.parametrize("with_websocket", [True, False])
def test_timeout_is_honoured_while_connecting(tmp_path, capsys, monkeypatch, with_websocket):
    """A port that accepts connections and never answers: --timeout 2 gives up in about 2 s."""
    import socket
    import time

    if not with_websocket:
        monkeypatch.setattr(cc, "websocket", None)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    api = tmp_path / "api.json"
    api.write_text(json.dumps(PROMPT))
    try:
        t0 = time.monotonic()
        code = cc.main([str(api), "--server", f"http://127.0.0.1:{silent.getsockname()[1]}", "--timeout", "2", "-q"])
        seconds = time.monotonic() - t0
    finally:
        silent.close()
    assert code == 4
    assert seconds < 4.5, f"gave up after {seconds:.1f} s with --timeout 2"
    assert "cannot reach ComfyUI" in capsys.readouterr().err


def test_output_files_are_every_file_an_output_names():
    """SaveImage's `images`, AnchorDiff's previews (`anchordiff_images`), other nodes' file lists; not
    the layout info, text or flags next to them."""
    saved = {"filename": "m_00001_.png", "subfolder": "masks", "type": "output"}
    preview = {"filename": "ComfyUI_temp_x_00001_.png", "subfolder": "", "type": "temp"}
    assert cc.output_files({"images": [saved]}) == [saved]
    assert cc.output_files({"anchordiff_images": [preview], "anchordiff": [{"concepts": ["cat"], "panels": 1}]}) == [preview]
    assert cc.output_files({"text": ["step 14"], "animated": [False], "gifs": [saved, preview]}) == [saved, preview]
