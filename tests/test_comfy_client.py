"""anchordiff_client without a server: workflow files, overrides, error texts.
(tests/test_server.py runs it against a real ComfyUI.)"""
import json
import subprocess
import sys
import time

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


# ------------------------------------------------------------------------------ servers that cannot be trusted
class FakeComfy:
    """A small HTTP server speaking (or pretending to speak) ComfyUI's API, one behaviour per test:
    `history` is the /history entry of prompt "p1" (None: never there), `ws_messages` the text
    frames /ws sends after the handshake (None: /ws answers 404), `trickle_prompt` makes POST
    /prompt answer one byte a second."""

    def __init__(self):
        import http.server
        import threading

        self.history, self.ws_messages, self.trickle_prompt, self.views = None, None, False, []
        self.prompt_answer = (200, {"prompt_id": "p1", "number": 0, "node_errors": {}})  # POST /prompt's status and body
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def send_body(self, body: bytes, status=200, kind="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                import urllib.parse

                path, _, query = self.path.partition("?")
                if path == "/ws":
                    return self.websocket()
                if path == "/history/p1":
                    return self.send_body(json.dumps({} if fake.history is None else {"p1": fake.history}).encode())
                if path.startswith("/object_info/"):
                    name = urllib.parse.unquote(path.rsplit("/", 1)[1])
                    return self.send_body(json.dumps({name: {"output_node": name == "SaveImage"}}).encode())
                if path == "/view":
                    fake.views.append(dict(urllib.parse.parse_qsl(query)))
                    return self.send_body(b"PNG", kind="image/png")
                self.send_body(b"{}", 404)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, answer = fake.prompt_answer
                body = json.dumps(answer).encode()
                if not fake.trickle_prompt:
                    return self.send_body(body, status)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(1.0)
                except OSError:  # the client gave up, as it should
                    pass

            def websocket(self):
                import base64
                import hashlib

                if fake.ws_messages is None:
                    return self.send_body(b"{}", 404)
                key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
                self.end_headers()
                time.sleep(0.5)  # after the client has queued its prompt
                try:
                    for text in fake.ws_messages:
                        payload = text.encode()
                        self.wfile.write(bytes([0x81, len(payload)]) + payload)  # one text frame (< 126 bytes)
                        self.wfile.flush()
                    time.sleep(30)  # the socket stays open and silent
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


SAVE_PROMPT = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "m"}}}


@pytest.fixture
def fake_comfy():
    server = FakeComfy()
    yield server
    server.close()


def run_cli(tmp_path, server_url, *extra):
    api = tmp_path / "api.json"
    api.write_text(json.dumps(SAVE_PROMPT))
    t0 = time.monotonic()
    code = cc.main([str(api), "--server", server_url, "--out", str(tmp_path / "out" / "here"), "-q", *extra])
    return code, time.monotonic() - t0


def done_entry(outputs: dict) -> dict:
    return {"status": {"status_str": "success", "completed": True, "messages": []}, "outputs": outputs}


LONG = "x" * 5000


@pytest.mark.parametrize("node_id, item", [
    ("9/../../../evil", {"filename": "a.png", "subfolder": "", "type": "temp"}),            # node id with ..
    ("/etc/cron.d/x", {"filename": "a.png", "subfolder": "", "type": "temp"}),              # absolute node id
    ("..\\..\\evil", {"filename": "a.png", "subfolder": "", "type": "temp"}),               # backslashes in the node id
    ("9", {"filename": "a.png", "subfolder": "/tmp/outside", "type": "output"}),            # absolute subfolder
    ("9", {"filename": "a.png", "subfolder": "../../..", "type": "output"}),               # subfolder of ..
    ("9", {"filename": "a.png", "subfolder": "..\\..\\up", "type": "output"}),             # backslash subfolder
    ("9", {"filename": "../../evil.png", "subfolder": "", "type": "output"}),              # file name with ..
    ("9", {"filename": "/etc/passwd", "subfolder": "", "type": "output"}),                 # absolute file name
    ("9", {"filename": "..", "subfolder": "..", "type": "output"}),                        # nothing but ..
    ("9", {"filename": "a\x00.png", "subfolder": "s\x00b", "type": "output"}),            # NUL
    ("9", {"filename": "a\ud800\n.png", "subfolder": "", "type": "output"}),              # surrogate, newline
    ("9", {"filename": LONG + ".png", "subfolder": LONG, "type": "output"}),               # very long
    (LONG, {"filename": LONG, "subfolder": "", "type": "temp"}),                           # very long node id
    ("9", {"filename": "a.png", "subfolder": "", "type": "../../../output"}),              # odd type
])
def test_every_name_from_the_server_stays_inside_out(node_id, item):
    name = cc.local_name(node_id, item)
    assert name and "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
    assert name.isprintable() and len(name.encode()) <= cc.MAX_NAME_BYTES  # encode(): no lone surrogate left
    if item["filename"].endswith(".png"):
        assert name.endswith(".png")


def test_plain_names_are_kept():
    assert cc.local_name("9", {"filename": "m_00001_.png", "subfolder": "masks/cat", "type": "output"}) == "masks_cat_m_00001_.png"
    assert cc.local_name("12", {"filename": "ComfyUI_temp_x_00001_.png", "subfolder": "", "type": "temp"}) == "preview-12-ComfyUI_temp_x_00001_.png"


def test_hostile_history_writes_only_inside_out(fake_comfy, tmp_path, monkeypatch):
    """Names from /history built to escape --out (node ids, subfolders, file names, absolute
    paths, backslashes, NUL, very long): every file lands directly in --out, none elsewhere."""
    monkeypatch.setattr(cc, "websocket", None)
    outputs = {
        "9": {"images": [{"filename": "../../../escaped.png", "subfolder": "/", "type": "output"},
                         {"filename": "a.png", "subfolder": "/tmp/abs", "type": "output"},
                         {"filename": "b\x00.png", "subfolder": "..\\..", "type": "output"},
                         {"filename": LONG + ".png", "subfolder": LONG, "type": "output"}]},
        "/../../../x": {"anchordiff_images": [{"filename": "p.png", "subfolder": "", "type": "temp"}]},
    }
    fake_comfy.history = done_entry(outputs)
    code, _ = run_cli(tmp_path, fake_comfy.url, "--timeout", "20")
    assert code == 0
    out = tmp_path / "out" / "here"
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != "api.json")
    assert len(written) == 5 and all(p.parent == out for p in written), written
    assert not (tmp_path / "x").exists() and not list((tmp_path / "out").glob("preview*"))
    # what /view is asked for is the server's own name, unchanged
    assert {v["filename"] for v in fake_comfy.views} >= {"../../../escaped.png", "p.png"}


@pytest.mark.parametrize("message", ["not json at all", "[1, 2]", '{"data": {}}', '{"type": 5}',
                                     '{"type": "status", "data": "x"}', '{"type": "execution_cached", "data": {"nodes": 3}}',
                                     '{"type": "executing", "data": {"node": [1], "prompt_id": "p1"}}'])
def test_a_websocket_message_that_is_not_comfyuis_protocol_is_the_not_comfyui_error(fake_comfy, tmp_path, capsys, message):
    fake_comfy.ws_messages = [message]
    code, _ = run_cli(tmp_path, fake_comfy.url, "--timeout", "20")
    err = capsys.readouterr().err
    assert code == 4, err
    assert err.startswith(f"error: {fake_comfy.url} does not look like a ComfyUI server: the websocket /ws sent"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("history", [[], {"status": "done", "outputs": {}}, {"status": {"messages": [["x"]]}, "outputs": {}},
                                     {"status": {"completed": True, "messages": []}, "outputs": {"9": []}}])
def test_a_history_entry_that_is_not_comfyuis_is_the_not_comfyui_error(fake_comfy, tmp_path, capsys, monkeypatch, history):
    monkeypatch.setattr(cc, "websocket", None)
    fake_comfy.history = history
    code, _ = run_cli(tmp_path, fake_comfy.url, "--timeout", "20")
    err = capsys.readouterr().err
    assert code == 4 and "does not look like a ComfyUI server: GET /history" in err, err


def test_timeout_bounds_a_prompt_answer_sent_one_byte_a_second(fake_comfy, tmp_path, capsys):
    fake_comfy.ws_messages, fake_comfy.trickle_prompt = [], True
    code, seconds = run_cli(tmp_path, fake_comfy.url, "--timeout", "3")
    assert code == 4 and seconds < 5.0, (code, seconds)
    assert "within the time limit" in capsys.readouterr().err


@pytest.mark.parametrize("with_websocket", [True, False])
def test_timeout_bounds_a_success_that_never_reaches_history(fake_comfy, tmp_path, capsys, monkeypatch, with_websocket):
    """The websocket says the prompt succeeded (or, polling, nothing ever comes): /history stays empty."""
    if not with_websocket:
        monkeypatch.setattr(cc, "websocket", None)
    fake_comfy.ws_messages = ['{"type": "execution_success", "data": {"prompt_id": "p1"}}']
    code, seconds = run_cli(tmp_path, fake_comfy.url, "--timeout", "3")
    assert code == 4 and seconds < 5.0, (code, seconds)
    assert "time limit" in capsys.readouterr().err


@pytest.mark.parametrize("status, answer", [
    (200, {"prompt_id": 5}), (200, {"prompt_id": "p1", "node_errors": ["x"]}),
    (200, {"prompt_id": "p1", "node_errors": {"3": {"errors": "bad"}}}),
    (400, {"error": {"message": "x"}, "node_errors": {"3": ["bad"]}}), (400, {"error": 5}),
])
def test_a_prompt_answer_that_is_not_comfyuis_is_the_not_comfyui_error(fake_comfy, tmp_path, capsys, monkeypatch, status, answer):
    monkeypatch.setattr(cc, "websocket", None)
    fake_comfy.prompt_answer = (status, answer)
    code, _ = run_cli(tmp_path, fake_comfy.url, "--timeout", "20")
    err = capsys.readouterr().err
    assert code == 4 and f"does not look like a ComfyUI server: POST /prompt answered HTTP {status}" in err, err
