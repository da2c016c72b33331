"""Run a ComfyUI workflow (API format) against a running server, from the command line or Python.

    python -m anchordiff_client workflow_api.json --server http://127.0.0.1:8188 \\
        --concepts "cat, dog" --seed 7 --set "12.steps=20" --out masks/

Queues the prompt (POST /prompt), follows it on the websocket (/ws), downloads every image it
produced (SaveImage and previews, via /view) and exits non-zero with ComfyUI's own error text
when the server rejects the prompt, a node fails, or an output node of the prompt produced
nothing (ComfyUI queues a prompt whose other outputs are valid and drops the invalid chains).
See docs/CLIENT.md.

Standard library only, plus `websocket-client` when installed (extra `anchordiff[client]`) for
live progress; without it the client polls /history instead. No torch, no ComfyUI imports.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import mimetypes
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

try:
    import websocket  # websocket-client
except ImportError:  # pragma: no cover - exercised only where the extra is missing
    websocket = None

DEFAULT_SERVER = "http://127.0.0.1:8188"
SEED_INPUTS = ("seed", "noise_seed")
CHECK_SERVER = "Check --server (ComfyUI's address, e.g. http://127.0.0.1:8188)."
MAX_NAME_BYTES = 200  # a downloaded file's name: under every common filesystem's 255, with room for "-N"


# ------------------------------------------------------------------------------ errors
class ClientError(Exception):
    """A problem with the request itself (workflow file, --set, --image). Exit code 2."""

    exit_code = 2


class ServerError(ClientError):
    """The server cannot be reached, answered unexpectedly, or the prompt did not finish in time."""

    exit_code = 4


class PromptRejected(ClientError):
    """POST /prompt answered 400: ComfyUI's validation message and per-node errors."""

    exit_code = 1

    def __init__(self, body: dict, prompt: dict):
        self.body = body
        super().__init__(format_rejection(body, prompt))


class ExecutionFailed(ClientError):
    """A node raised while the prompt ran (websocket `execution_error`)."""

    exit_code = 1

    def __init__(self, data: dict, prompt: dict):
        self.data = data
        super().__init__(format_execution_error(data, prompt))


class OutputsMissing(ClientError):
    """The prompt ran, but output nodes it holds never ran: ComfyUI dropped their chains (HTTP 200
    with `node_errors`) or skipped them. `.result` holds what did run and was downloaded."""

    exit_code = 1

    def __init__(self, missing: list, node_errors: dict, prompt: dict, result: "RunResult"):
        self.missing, self.node_errors, self.result = missing, node_errors, result
        lines = [f"ComfyUI did not run output node(s) {', '.join(node_label(prompt, n) for n in missing)}"
                 + (": it dropped their chains for these errors" if node_errors else "")]
        lines += node_error_lines(node_errors, prompt)
        super().__init__("\n".join(lines))


class ExecutionInterrupted(ClientError):
    """The prompt was interrupted (POST /interrupt, or Ctrl-C here)."""

    exit_code = 3

    def __init__(self, data: dict, prompt: dict):
        self.data = data
        super().__init__(f"ComfyUI interrupted the prompt at {node_label(prompt, data.get('node_id'))}.")


def node_label(prompt: dict, node_id) -> str:
    node = prompt.get(str(node_id)) or {}
    title = (node.get("_meta") or {}).get("title")
    label = f"node {node_id} ({node.get('class_type', '?')}"
    return label + (f' "{title}")' if title and title != node.get("class_type") else ")")


def format_rejection(body: dict, prompt: dict) -> str:
    error = body.get("error") or {}
    if isinstance(error, str):
        error = {"message": error}
    lines = [f"ComfyUI rejected the prompt: {_message(error) or 'invalid prompt'}"]
    return "\n".join(lines + node_error_lines(body.get("node_errors") or {}, prompt))


def _rejection_well_formed(body: dict) -> bool:
    """POST /prompt's 400 answer has ComfyUI's shape: error a dict or text, node_errors
    {id: {"errors": [{message, details}...]}}."""
    node_errors = body.get("node_errors") or {}
    return isinstance(body.get("error") or {}, (dict, str)) and isinstance(node_errors, dict) and all(
        isinstance(info or {}, dict) and isinstance((info or {}).get("errors", []), list)
        and all(isinstance(item, dict) for item in (info or {}).get("errors", []))
        for info in node_errors.values())


def node_error_lines(node_errors: dict, prompt: dict) -> list[str]:
    """ComfyUI's per-node validation errors, one indented line each."""
    return [f"  {node_label(prompt, node_id)}: {_message(item)}"
            for node_id, info in node_errors.items() for item in (info or {}).get("errors", [])]


def format_execution_error(data: dict, prompt: dict) -> str:
    kind = str(data.get("exception_type", "")).rsplit(".", 1)[-1]
    message = str(data.get("exception_message", "")).strip()
    where = node_label(prompt, data.get("node_id"))
    return f"ComfyUI error in {where}: " + (f"{kind}: {message}" if kind else message)


def _message(item: dict) -> str:
    message, details = item.get("message", ""), item.get("details", "")
    return f"{message}: {details}" if details and details != message else message


# ------------------------------------------------------------------------------ workflow files
def load_workflow(path) -> dict:
    """An API-format prompt {id: {class_type, inputs}} from a file (or a {"prompt": ...} wrapper)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ClientError(f"cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ClientError(f"{path} is not JSON: {error}") from None
    return check_api_prompt(data, str(path))


def check_api_prompt(data, name: str = "the workflow") -> dict:
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ClientError(
            f"{name} is a UI workflow (the format ComfyUI's editor saves); this client needs the API format. "
            "In ComfyUI open it and use Workflow > Export (API), then run that file."
        )
    if not isinstance(data, dict) or not data or not all(
        isinstance(node, dict) and "class_type" in node and isinstance(node.get("inputs", {}), dict) for node in data.values()
    ):
        raise ClientError(f"{name} is not an API-format prompt ({{node id: {{class_type, inputs}}}}).")
    return data


def find_node(prompt: dict, ref: str) -> str:
    """Node id for `ref`: a node id, a title (_meta.title), or a class_type; must be unambiguous."""
    ref = ref.strip()
    if ref in prompt:
        return ref
    for key in (lambda n: (n.get("_meta") or {}).get("title"), lambda n: n.get("class_type")):
        found = [node_id for node_id, node in prompt.items() if key(node) == ref]
        if len(found) == 1:
            return found[0]
        if found:
            raise ClientError(f"'{ref}' matches nodes {', '.join(found)}: use one node id instead.")
    known = ", ".join(f"{i} {(n.get('_meta') or {}).get('title') or n['class_type']!r}" for i, n in prompt.items())
    raise ClientError(f"no node '{ref}' in the workflow (nodes: {known}).")


def _lookup(prompt: dict, ref: str) -> Optional[str]:
    try:
        return find_node(prompt, ref)
    except ClientError:
        return None


def convert_value(text: str, current, where: str):
    """`text` as the type of the value it replaces (int, float, bool or string)."""
    if isinstance(current, list):
        raise ClientError(f"{where} is connected to node {current[0]}, not a value: it cannot be set.")
    try:
        if isinstance(current, bool):
            if text.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.strip().lower() in ("true", "1", "yes")
        if isinstance(current, int):  # JSON writes 4.0 as 4: a FLOAT input may hold an int
            try:
                return int(text)
            except ValueError:
                return float(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        wanted = {bool: "true or false", int: "an integer", float: "a number"}[type(current)]
        raise ClientError(f"{where} needs {wanted}; got '{text}'.") from None
    return text


def set_input(prompt: dict, assignment: str) -> None:
    """Apply 'NODE.input=value' (NODE: id, title or class_type) in place."""
    key, eq, value = assignment.partition("=")
    ref, dot, name = key.rpartition(".")
    if not eq or not dot or not ref or not name:
        raise ClientError(f"--set needs NODE.input=value (e.g. '12.seed=7' or 'AnchorDiff Concepts.concepts=cat, dog'); got '{assignment}'.")
    node_id = find_node(prompt, ref)
    inputs = prompt[node_id].setdefault("inputs", {})
    name = name.strip()
    if name not in inputs:
        raise ClientError(f"{node_label(prompt, node_id)} has no input '{name}' (inputs: {', '.join(inputs) or 'none'}).")
    inputs[name] = convert_value(value, inputs[name], f"{node_label(prompt, node_id)}.{name}")


def set_everywhere(prompt: dict, names, value, what: str, class_type: Optional[str] = None) -> list[str]:
    """Set inputs `names` (that hold values, not links) on every node (of `class_type`); returns node ids."""
    changed = []
    for node_id, node in prompt.items():
        if class_type and node["class_type"] != class_type:
            continue
        for name in names:
            current = node.get("inputs", {}).get(name)
            if name in node.get("inputs", {}) and not isinstance(current, list):
                node["inputs"][name] = convert_value(str(value), current, f"{node_label(prompt, node_id)}.{name}")
                changed.append(node_id)
    if not changed:
        raise ClientError(f"{what}: the workflow has no such input to set.")
    return changed


# ------------------------------------------------------------------------------ the server
@dataclass
class RunResult:
    prompt_id: str
    files: list[Path] = field(default_factory=list)
    node_files: dict = field(default_factory=dict)  # node id -> its downloaded files, in output order
    outputs: dict = field(default_factory=dict)  # /history outputs: node id -> {"images": [...], ...}
    node_seconds: dict = field(default_factory=dict)  # node id -> wall time between its 'executing' and the next event
    cached: list = field(default_factory=list)
    executed: list = field(default_factory=list)  # node ids ComfyUI said it was executing (websocket)
    node_errors: dict = field(default_factory=dict)  # POST /prompt's node_errors: chains ComfyUI dropped
    seconds: float = 0.0


class ComfyClient:
    """Thin wrapper over ComfyUI's HTTP + websocket API."""

    def __init__(self, server: str = DEFAULT_SERVER, client_id: Optional[str] = None, http_timeout: float = 60.0):
        self.server = server.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.http_timeout = http_timeout
        self.deadline: Optional[float] = None  # time.monotonic() by which every request and wait ends (time_limit)

    # ---------------------------------------------------------------- HTTP
    def seconds_left(self, what: str) -> float:
        """Seconds `what` may take: the HTTP timeout, cut to what is left of the run's deadline."""
        if self.deadline is None:
            return self.http_timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ServerError(f"time limit reached before {what}")
        return min(self.http_timeout, left)

    @contextlib.contextmanager
    def time_limit(self, seconds: float):
        """Every request and wait inside ends within `seconds` (or the earlier deadline already set)."""
        previous = self.deadline
        end = time.monotonic() + seconds
        self.deadline = end if previous is None else min(previous, end)
        try:
            yield
        finally:
            self.deadline = previous

    def request(self, path: str, data: Optional[bytes] = None, headers: Optional[dict] = None) -> tuple[int, bytes]:
        """(HTTP status, body); the whole exchange, however slowly the server answers, ends within
        seconds_left() (a server sending a byte a second is cut off, not waited for)."""
        method = "POST" if data is not None else "GET"
        what = f"{method} {path.split('?')[0]}"
        seconds = self.seconds_left(what)
        url = urllib.parse.urlsplit(self.server)
        connection = (http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection)(url.netloc, timeout=seconds)
        with cut_off_after(seconds, lambda: connection.sock) as expired:
            try:
                connection.request(method, url.path + path, body=data, headers=headers or {})
                response = connection.getresponse()
                status, body = response.status, response.read()
            except (OSError, http.client.HTTPException) as error:
                if expired.is_set() or isinstance(error, socket.timeout):
                    raise self.no_answer(what) from None
                raise ServerError(f"cannot reach ComfyUI at {self.server}: {getattr(error, 'reason', None) or error}") from None
            finally:
                connection.close()
        if expired.is_set():  # the cut-off ended a body sent without a length
            raise self.no_answer(what)
        return status, body

    def no_answer(self, what: str) -> ServerError:
        return ServerError(f"cannot reach ComfyUI at {self.server}: {what} got no complete answer within the time limit")

    def not_comfyui(self, what: str, status, body: bytes = b"") -> ServerError:
        """One line for an answer no ComfyUI server gives (an HTML page, another service)."""
        looks = " with an HTML page" if body.lstrip()[:1] == b"<" else ""
        return self.not_protocol(f"{what} answered HTTP {status}{looks}")

    def not_protocol(self, what: str) -> ServerError:
        """The error for anything the server sends that is not ComfyUI's protocol (exit code 4)."""
        return ServerError(f"{self.server} does not look like a ComfyUI server: {what}. {CHECK_SERVER}")

    def get_json(self, path: str):
        status, body = self.request(path)
        if status != 200:
            raise self.not_comfyui(f"GET {path.split('?')[0]}", status, body)
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise self.not_comfyui(f"GET {path.split('?')[0]}", status, body) from None

    def post_json(self, path: str, payload) -> tuple[int, bytes]:
        return self.request(path, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def queue_prompt(self, prompt: dict) -> dict:
        """POST /prompt: ComfyUI's answer {prompt_id, number, node_errors}. `node_errors` is not
        empty when ComfyUI queued the prompt without the chains of some invalid outputs."""
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        try:
            answer = json.loads(body)
        except json.JSONDecodeError:
            raise self.not_comfyui("POST /prompt", status, body) from None
        if status == 400 and isinstance(answer, dict) and ("error" in answer or "node_errors" in answer):
            if not _rejection_well_formed(answer):
                raise self.not_comfyui("POST /prompt", status, body)
            raise PromptRejected(answer, prompt)
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("prompt_id"), str) \
                or not _rejection_well_formed(answer):
            raise self.not_comfyui("POST /prompt", status, body)
        return answer

    def output_classes(self, prompt: dict) -> set:
        """The prompt's class types that are output nodes (GET /object_info/<class>)."""
        found = set()
        for class_type in sorted({node["class_type"] for node in prompt.values()}):
            answer = self.get_json(f"/object_info/{urllib.parse.quote(class_type)}")
            info = (answer.get(class_type) if isinstance(answer, dict) else None) or {}
            if not isinstance(info, dict):
                raise self.not_protocol(f"GET /object_info/{class_type} answered something other than a node description")
            if info.get("output_node"):
                found.add(class_type)
        return found

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def history(self, prompt_id: str) -> Optional[dict]:
        """The /history entry of `prompt_id` (None while there is none), its shape checked."""
        answer = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        if not isinstance(answer, dict):
            raise self.not_protocol("GET /history answered something other than a JSON object")
        return check_history_entry(self, answer.get(prompt_id))

    def upload_image(self, path) -> str:
        """POST /upload/image; returns the name to give LoadImage ('subfolder/name' if any)."""
        path = Path(path)
        try:
            content = path.read_bytes()
        except OSError as error:
            raise ClientError(f"cannot read image {path}: {error.strerror}") from None
        boundary = uuid.uuid4().hex
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            f"Content-Type: {mime}\r\n\r\n"
        ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
        status, answer = self.request("/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            if answer.lstrip()[:1] == b"<":
                raise self.not_comfyui("POST /upload/image", status, answer)
            text = answer.decode("utf-8", "replace").strip().splitlines()
            raise ServerError(f"uploading {path} answered HTTP {status}" + (f": {text[0][:200]}" if text else ""))
        try:
            info = json.loads(answer)
        except json.JSONDecodeError:
            raise self.not_comfyui("POST /upload/image", status, answer) from None
        if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not isinstance(info.get("subfolder", ""), (str, type(None))):
            raise self.not_comfyui("POST /upload/image", status, answer)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def download(self, image: dict, dest: Path) -> Path:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        status, content = self.request(f"/view?{query}")
        if status != 200:
            raise ServerError(f"downloading {image.get('filename')} answered {status}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content)
        return dest

    # ---------------------------------------------------------------- websocket
    def connect(self, timeout: float = 10.0):
        """An open websocket for this client id, or None without websocket-client. The handshake
        ends within `timeout` (and the run's deadline)."""
        if websocket is None:
            return None
        url = urllib.parse.urlsplit(self.server)
        scheme = "wss" if url.scheme == "https" else "ws"
        seconds = min(timeout, self.seconds_left("the websocket /ws"))
        ws = websocket.WebSocket()
        with cut_off_after(seconds, lambda: ws.sock) as expired:
            try:
                ws.connect(f"{scheme}://{url.netloc}{url.path}/ws?clientId={self.client_id}", timeout=seconds)
                return ws
            except websocket.WebSocketBadStatusException as error:
                raise self.not_comfyui("the websocket /ws", error.status_code, error.resp_body or b"") from None
            except (OSError, websocket.WebSocketException) as error:
                ws.close()
                timed_out = expired.is_set() or isinstance(error, (TimeoutError, websocket.WebSocketTimeoutException))
                reason = "no answer within the time limit" if timed_out else error
                raise ServerError(f"cannot reach ComfyUI at {self.server} (websocket /ws): {reason}") from None


@contextlib.contextmanager
def cut_off_after(seconds: float, sock_of: Callable[[], Optional[socket.socket]]):
    """Shut down the socket `sock_of()` when `seconds` have passed, so a blocked read returns
    (socket timeouts bound each read, not a server that sends a byte at a time). Yields an Event
    that is set if it did."""
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = sock_of()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(max(seconds, 0.0), cut)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


# ------------------------------------------------------------------------------ following a prompt
class Progress:
    """Readable progress lines: one per node started; a live counter on a terminal."""

    def __init__(self, prompt: dict, stream=None, quiet: bool = False):
        self.prompt, self.stream, self.quiet = prompt, stream or sys.stderr, quiet
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.live = False  # a \r-updated counter is on the terminal's last line
        self.quarter = -1  # off a terminal: print at 0, 25, 50, 75, 100 %

    def say(self, text: str) -> None:
        if self.quiet:
            return
        self.stream.write(("\n" if self.live else "") + text + "\n")
        self.stream.flush()
        self.live, self.quarter = False, -1

    def progress(self, node_id, value: int, maximum: int) -> None:
        if self.quiet or maximum <= 0:
            return
        percent = int(100 * value / maximum)
        text = f"    {node_label(self.prompt, node_id)}: {value}/{maximum} ({percent}%)"
        if self.tty:
            self.stream.write("\r" + text)
            self.live = True
        elif percent // 25 != self.quarter:
            self.stream.write(text + "\n")
            self.quarter = percent // 25
        self.stream.flush()


def follow(client: ComfyClient, ws, prompt_id: str, prompt: dict, progress: Progress,
           result: RunResult, on_event: Optional[Callable[[str, dict], None]] = None) -> None:
    """Read websocket events of `prompt_id` until it ends (by client.deadline); raise on error or
    interruption. Polls /history whenever the socket is silent for 5 s (or is gone), so it cannot
    miss the end."""
    started: dict = {}

    def node_done(now: float) -> None:
        for node_id, t0 in started.items():
            result.node_seconds[node_id] = round(now - t0, 3)
        started.clear()

    while True:
        remaining = client.deadline - time.monotonic() if client.deadline is not None else 5.0
        if remaining <= 0:
            raise ServerError(f"prompt {prompt_id} did not finish within the time limit")
        message = None
        if ws is not None:
            seconds = min(5.0, remaining)
            with cut_off_after(seconds + 0.5, lambda: ws.sock) as expired:
                try:
                    ws.settimeout(seconds)
                    message = ws.recv()
                except websocket.WebSocketTimeoutException:
                    pass
                except (OSError, websocket.WebSocketException):
                    if not expired.is_set():
                        progress.say("websocket closed; polling /history")
                    ws = None
            if expired.is_set():  # a frame trickling in slower than the time left: polling takes over
                ws = None
        else:
            time.sleep(min(1.0, remaining))
        if isinstance(message, bytes):  # a binary preview frame
            continue
        if not message:  # silence or no socket: ask /history
            entry = client.history(prompt_id)
            if entry and entry["status"].get("completed") is not None:
                node_done(time.monotonic())
                _raise_for_history(entry, prompt)
                return
            continue
        kind, data = parse_event(client, message)
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        if on_event is not None:
            on_event(kind, data)
        now = time.monotonic()
        if kind == "execution_start":
            progress.say(f"prompt {prompt_id}: started")
        elif kind == "execution_cached" and data.get("nodes"):
            result.cached = [str(node) for node in data["nodes"]]
            progress.say(f"  cached: {', '.join(result.cached)}")
        elif kind == "executing" and data.get("prompt_id") == prompt_id:
            node_done(now)
            if data.get("node") is None:  # end of the prompt (older servers send only this)
                return
            started[data["node"]] = now
            result.executed.append(str(data["node"]))
            progress.say(f"  {node_label(prompt, data['node'])}")
        elif kind == "progress":
            progress.progress(data.get("node"), _number(data.get("value")), _number(data.get("max")))
        elif kind == "executed":
            node_done(now)
        elif kind == "execution_success":
            node_done(now)
            return
        elif kind == "execution_error":
            raise ExecutionFailed(data, prompt)
        elif kind == "execution_interrupted":
            raise ExecutionInterrupted(data, prompt)


def parse_event(client: ComfyClient, message) -> tuple[str, dict]:
    """(type, data) of one websocket text message; anything that is not ComfyUI's protocol
    ({"type": str, "data": {...}} in JSON) is the not-a-ComfyUI-server error."""
    try:
        event = json.loads(message)
    except (ValueError, TypeError):
        raise client.not_protocol("the websocket /ws sent a message that is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str) or not isinstance(event.get("data", {}), (dict, type(None))):
        raise client.not_protocol("the websocket /ws sent a message without ComfyUI's {type, data} form")
    data = event.get("data") or {}
    if event["type"] == "execution_cached" and not isinstance(data.get("nodes", []), list):
        raise client.not_protocol("the websocket /ws sent an execution_cached event without a list of nodes")
    if event["type"] in ("executing", "progress", "executed") and not isinstance(data.get("node"), (str, int, type(None))):
        raise client.not_protocol(f"the websocket /ws sent an {event['type']} event whose node is not a node id")
    return event["type"], data


def _number(value) -> int:
    """A progress count as an int (0 for anything else the server sends)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


def check_history_entry(client: ComfyClient, entry) -> Optional[dict]:
    """One /history entry with the shapes the client reads, or the not-a-ComfyUI-server error."""
    if entry is None:
        return None
    status = entry.get("status", {}) if isinstance(entry, dict) else None
    outputs = entry.get("outputs", {}) if isinstance(entry, dict) else None
    messages = status.get("messages", []) if isinstance(status, dict) else None
    well_formed = (
        isinstance(outputs, dict) and all(isinstance(output, dict) for output in outputs.values())
        and isinstance(messages, list)
        and all(isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], (dict, type(None))) for m in messages)
    )
    if not well_formed:
        raise client.not_protocol("GET /history sent an entry without ComfyUI's {status, outputs} form")
    return {**entry, "status": status, "outputs": outputs}


def _raise_for_history(entry: dict, prompt: dict) -> None:
    status = entry["status"]
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            raise ExecutionFailed(data or {}, prompt)
        if kind == "execution_interrupted":
            raise ExecutionInterrupted(data or {}, prompt)
    if status.get("status_str") not in (None, "success"):
        raise ServerError(f"prompt ended with status {status.get('status_str')}")


def wait_for_history(client: ComfyClient, prompt_id: str, timeout: Optional[float] = None) -> dict:
    """ComfyUI writes history right after execution_success: wait until it is there, within the
    run's deadline (client.time_limit) or `timeout` seconds, whichever ends first."""
    with client.time_limit(client.http_timeout if timeout is None else timeout):
        while True:
            entry = client.history(prompt_id)
            if entry and entry["status"].get("completed") is not None:
                return entry
            if client.deadline - time.monotonic() <= 0.2:
                raise ServerError(f"prompt {prompt_id} finished but /history has no entry for it within the time limit")
            time.sleep(0.2)


# ------------------------------------------------------------------------------ the whole run
def prepare_prompt(prompt: dict, sets=(), concepts: Optional[str] = None, seed: Optional[int] = None,
                   images=(), client: Optional[ComfyClient] = None) -> dict:
    """A copy of `prompt` with the overrides applied (uploading `images` through `client`)."""
    prompt = json.loads(json.dumps(prompt))
    if concepts is not None:
        set_everywhere(prompt, ("concepts",), concepts, "--concepts (no 'AnchorDiff Concepts' node)", "AnchorDiffConcepts")
    if seed is not None:
        set_everywhere(prompt, SEED_INPUTS, seed, "--seed (no seed / noise_seed input)")
    for spec in images:
        ref, eq, path = str(spec).partition("=")
        node_id = _lookup(prompt, ref) if eq else None
        if node_id is None:
            path = str(spec)
            loaders = [i for i, n in prompt.items() if n["class_type"] == "LoadImage"]
            if len(loaders) != 1:
                raise ClientError(
                    f"--image needs exactly one LoadImage node; the workflow has {len(loaders)}"
                    + (f" ({', '.join(loaders)}): use --image NODE=PATH." if loaders else ".")
                )
            node_id = loaders[0]
        if client is None:
            raise ClientError("--image needs a server to upload to")
        prompt[node_id].setdefault("inputs", {})["image"] = client.upload_image(path)
    for assignment in sets:
        set_input(prompt, assignment)
    return prompt


def run_prompt(prompt: dict, server: str = DEFAULT_SERVER, output_dir="comfy_output", timeout: float = 3600.0,
               previews: bool = True, quiet: bool = False, stream=None,
               on_event: Optional[Callable[[str, dict], None]] = None, client: Optional[ComfyClient] = None) -> RunResult:
    """Queue an API prompt, follow it to the end, download its images into `output_dir`; all of it
    within `timeout` seconds (one deadline for every request and wait).

    Raises PromptRejected / ExecutionFailed / ExecutionInterrupted (messages: ComfyUI's own text),
    ServerError, ClientError. `on_event(type, data)` sees every websocket event of this prompt."""
    client = client or ComfyClient(server, http_timeout=min(60.0, timeout))
    with client.time_limit(timeout):
        return _run(client, prompt, Path(output_dir), previews, Progress(prompt, stream, quiet), on_event)


def _run(client: ComfyClient, prompt: dict, out: Path, previews: bool, progress: Progress, on_event) -> RunResult:
    t0 = time.monotonic()
    ws = client.connect()
    if ws is None:
        progress.say("websocket-client is not installed: no live progress, polling /history")
    try:
        answer = client.queue_prompt(prompt)
        prompt_id = answer["prompt_id"]
        result = RunResult(prompt_id, node_errors=answer.get("node_errors") or {})
        progress.say(f"queued prompt {prompt_id} on {client.server}")
        for line in node_error_lines(result.node_errors, prompt):
            progress.say(f"  dropped for a validation error:{line[1:]}")
        try:
            follow(client, ws, prompt_id, prompt, progress, result, on_event)
        except KeyboardInterrupt:
            with client.time_limit(5.0), contextlib.suppress(ServerError):
                client.interrupt(prompt_id)
                client.post_json("/queue", {"delete": [prompt_id]})
            raise
    finally:
        if ws is not None:  # websocket-client waits up to 3 s for the server's close frame: not past the deadline
            ws.close(timeout=max(0.0, min(1.0, client.deadline - time.monotonic())))
    entry = wait_for_history(client, prompt_id)
    _raise_for_history(entry, prompt)
    result.outputs = entry["outputs"]
    for node_id, output in result.outputs.items():
        for item in output_files(output):
            if not previews and not is_saved(item):
                continue
            path = client.download(item, _unused(out / local_name(node_id, item)))
            result.files.append(path)
            result.node_files.setdefault(node_id, []).append(path)
    result.seconds = round(time.monotonic() - t0, 3)
    ran = set(result.executed) | set(map(str, result.cached)) | set(result.outputs) | _cached_in(entry)
    outputs = client.output_classes(prompt)
    missing = [node_id for node_id, node in prompt.items() if node["class_type"] in outputs and node_id not in ran]
    if missing or result.node_errors:
        raise OutputsMissing(missing, result.node_errors, prompt, result)
    progress.say(f"done in {result.seconds:.1f} s: {len(result.files)} file(s) in {out}")
    return result


def is_saved(item: dict) -> bool:
    """A file SaveImage wrote (type "output"), not a node's temp preview."""
    return item.get("type") == "output"


def safe_part(text) -> str:
    """`text` (sent by a server) as one harmless piece of a file name: letters, digits, '-', '_'
    and '.' kept, every other character (separators, NUL, controls, surrogates...) made '_',
    leading dots dropped (no '..', no hidden files)."""
    return "".join(c if (c.isalnum() and c.isprintable()) or c in "-_." else "_" for c in str(text)).lstrip(".")


def _fit(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """`name` cut to `limit` UTF-8 bytes, keeping its extension (if short)."""
    if len(name.encode()) <= limit:
        return name
    stem, dot, ext = name.rpartition(".")
    ext = "." + ext if dot and stem and len(ext.encode()) <= 16 else ""
    stem = name[: len(name) - len(ext)]
    return stem.encode()[: limit - len(ext.encode())].decode(errors="ignore") + ext


def _safe_parts(path) -> list[str]:
    """The non-empty safe_part()s of a server's path (either separator); [] for None."""
    parts = (safe_part(p) for p in str(path or "").replace("\\", "/").split("/"))
    return [p for p in parts if p]


def local_name(node_id, item: dict) -> str:
    """The local file name of one output file named by /history: nothing the server sends (node id,
    subfolder, file name, type) can lead outside the output folder. Saved images: the subfolder's
    parts and the file name joined by '_'; previews: preview-<node id>-<file name>."""
    pieces = _safe_parts(item.get("filename"))
    name = pieces[-1] if pieces else "file"
    if is_saved(item):
        name = "_".join(_safe_parts(item.get("subfolder")) + [name])
    else:
        name = f"preview-{safe_part(node_id) or 'node'}-{name}"
    return _fit(name)


def output_files(output: dict) -> list[dict]:
    """The files one node's /history output names ({filename, subfolder, type}), in order: its
    `images` and any other list of them (AnchorDiff's previews are `anchordiff_images`, which
    frontends leave to the pack's own extension; other nodes use `gifs`, `audio`...)."""
    return [item for items in output.values() if isinstance(items, list)
            for item in items if isinstance(item, dict) and "filename" in item and "type" in item]


def _cached_in(entry: dict) -> set:
    """Node ids /history reports as served from ComfyUI's cache."""
    return {str(node) for kind, data in entry.get("status", {}).get("messages", [])
            if kind == "execution_cached" for node in (data or {}).get("nodes", [])}


def _unused(path: Path) -> Path:
    """`path`, or `name-1.ext`, `name-2.ext`... if it exists (never overwrite earlier downloads)."""
    candidate = path
    for n in range(1, 100000):
        if not candidate.exists():
            return candidate
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    raise ClientError(f"too many files named like {path} already")


def run_workflow(workflow, server: str = DEFAULT_SERVER, sets=(), concepts: Optional[str] = None,
                 seed: Optional[int] = None, images=(), **kwargs) -> RunResult:
    """`workflow`: a path to an API-format file or the prompt dict itself; overrides as the CLI's."""
    prompt = load_workflow(workflow) if isinstance(workflow, (str, Path)) else check_api_prompt(workflow)
    client = kwargs.pop("client", None) or ComfyClient(server)
    with client.time_limit(kwargs.get("timeout", 3600.0)):  # the uploads count too
        prompt = prepare_prompt(prompt, sets, concepts, seed, images, client)
        return run_prompt(prompt, client=client, **kwargs)


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m anchordiff_client",
        description="Run a ComfyUI workflow (API format) on a server, follow its progress, download its images.",
        epilog="Exit codes: 0 success; 1 ComfyUI rejected the prompt, a node failed, or an output node produced nothing; "
        "2 bad arguments or workflow; "
        "3 interrupted; 4 server unreachable or time limit.",
    )
    p.add_argument("workflow", help="workflow file in API format (ComfyUI: Workflow > Export (API))")
    p.add_argument("--server", default=DEFAULT_SERVER, help=f"ComfyUI URL (default {DEFAULT_SERVER})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set an input; NODE is a node id, title or class type (repeatable)")
    p.add_argument("--concepts", help="concepts for every 'AnchorDiff Concepts' node, e.g. 'cat, dog'")
    p.add_argument("--seed", type=int, help="seed for every seed / noise_seed input")
    p.add_argument("--image", dest="images", action="append", default=[], metavar="[NODE=]PATH",
                   help="upload an image and load it in the LoadImage node (repeatable)")
    p.add_argument("--out", default="comfy_output", help="folder for the downloaded images (default comfy_output)")
    p.add_argument("--no-previews", action="store_true", help="download only saved images, not node previews")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (default 3600)")
    p.add_argument("--list", action="store_true", help="list the workflow's nodes and their settable inputs, then exit")
    p.add_argument("--dry-run", action="store_true", help="print the prompt with the overrides applied (images are not uploaded), then exit")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors and the downloaded files")
    return p


def list_nodes(prompt: dict) -> str:
    lines = []
    for node_id, node in prompt.items():
        values = {k: v for k, v in node.get("inputs", {}).items() if not isinstance(v, list)}
        lines.append(f"{node_label(prompt, node_id)}" + "".join(f"\n    {k} = {json.dumps(v)}" for k, v in values.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prompt = load_workflow(args.workflow)
        if args.list:
            print(list_nodes(prompt))
            return 0
        client = ComfyClient(args.server, http_timeout=min(60.0, args.timeout))
        if args.dry_run:
            print(json.dumps(prepare_prompt(prompt, args.sets, args.concepts, args.seed, (), None), indent=2))
            return 0
        result = run_workflow(prompt, sets=args.sets, concepts=args.concepts, seed=args.seed, images=args.images,
                              client=client, output_dir=args.out, timeout=args.timeout,
                              previews=not args.no_previews, quiet=args.quiet)
    except OutputsMissing as error:
        for path in error.result.files:
            print(path)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted: asked ComfyUI to stop the prompt", file=sys.stderr)
        return 130
    for path in result.files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
