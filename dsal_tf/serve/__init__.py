"""`dsal serve`: a run with the human oracle (`ORACLE = "files"`) as a live Label Studio ML backend.

Label Studio asks the backend for prelabels (`/predict`), orders its queue by their scores (uncertainty
sampling follows DSAL's ranking), and sends every annotation to `/webhook`; when the round's last mask
is in, the run imports, trains, scores and asks for the next round, whose tasks go straight into the
project. `/health`, `/info` and `/metrics` (MONAI Label style) say where the run is and how much the
annotators corrected the model's masks.

- `labels.py`: the labelling config's tags, brush regions and RLE (label-studio-sdk's codec);
- `datastore.py`: the pending request and the received masks, journal included;
- `backend.py`: the handlers (plain methods) and the worker that owns the run folder;
- `studio.py`: the Label Studio project kept in step (`--connect`);
- here: the HTTP server, the lock that keeps a second server off the run, and `serve` itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

from ..errors import DsalError
from ..run import Run
from .backend import Backend
from .labels import BadRequest

MAX_BODY = 256 * 2**20  # a bulk webhook of many large masks
GET_ROUTES = {"/": "health", "/health": "health", "/info": "info", "/metrics": "metrics"}
POST_ROUTES = {"/setup": "setup", "/predict": "predict", "/webhook": "webhook"}


class RunLock:
    """An exclusive lock on `exp/<name>/serve.lock` (released by the kernel when the process dies)."""

    def __init__(self, run: Path, url: str):
        self.path = Run(run).serve_lock
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise DsalError(f"{run} is already served ({holder}); stop that dsal serve first, one server "
                            "drives a run") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}, {url}")
        self.file.flush()

    def release(self) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def served_by(run: Path) -> str | None:
    """Who holds `run`'s serve lock ("pid N, URL"), or None when no `dsal serve` drives it. Probes with a
    non-blocking lock on a new descriptor, so the serving process itself must not call it."""
    path = Run(run).serve_lock
    if not path.is_file():
        return None
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def make_handler(backend: Backend) -> type[BaseHTTPRequestHandler]:
    """A request handler that routes to `backend`'s methods and answers JSON."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "dsal-serve"

        def do_GET(self):  # noqa: N802 (http.server's name)
            name = GET_ROUTES.get(urlparse(self.path).path.rstrip("/") or "/")
            self._answer(lambda: getattr(backend, name)() if name else (404, {"error": self._unknown()}))

        def do_POST(self):  # noqa: N802
            name = POST_ROUTES.get(urlparse(self.path).path.rstrip("/"))
            self._answer(lambda: getattr(backend, name)(self._body()) if name else (404, {"error": self._unknown()}))

        def _unknown(self) -> str:
            return (f"no endpoint {self.command} {self.path}; GET {sorted(GET_ROUTES)}, "
                    f"POST {sorted(POST_ROUTES)}")

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                raise BadRequest(f"the request body has {n} bytes, more than {MAX_BODY}", 413)
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
            except ValueError as exc:
                raise BadRequest(f"the request body is not JSON ({exc})", 400) from None
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object", 400)
            return body

        def _answer(self, call) -> None:
            try:
                status, body = call()
            except BadRequest as exc:
                status, body = exc.status, {"error": str(exc)}
            except DsalError as exc:
                status, body = 400, {"error": str(exc)}
            except FutureTimeout:
                status, body = 503, {"error": "the worker is busy (a round is training); send it again later"}
            except Exception as exc:  # a bug: say so, keep serving
                backend.log(f"error: {self.command} {self.path}: {type(exc).__name__}: {exc}")
                status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
            data = json.dumps(body).encode()
            if status >= 400:
                backend.log(f"{self.command} {self.path} -> {status}: {body.get('error')}")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            pass  # requests are not logged; refusals are (`_answer`)

    return Handler


def serve(cfg, host: str = "127.0.0.1", port: int = 9090, studio=None, label: str | None = None,
          log: Callable[[str], None] = print) -> None:
    """Serve the run of `cfg` (its saved config; ORACLE = "files") until interrupted (Ctrl-C, SIGTERM). With `studio`
    (`studio.Studio`), connect the project first; a failed connection stops the server with its reason."""
    from ..evaluate import saved_config

    cfg = saved_config(cfg)
    if cfg.oracle != "files":
        raise DsalError(f"{cfg.name} runs with ORACLE = {cfg.oracle!r}; dsal serve drives a person's run: "
                        "start one with dsal run --oracle files")
    backend = Backend(cfg, label, studio, log)
    backend.round  # noqa: B018 (a run that never asked for masks stops here, with what to do)
    url = f"http://{host}:{port}"
    lock = RunLock(backend.store.run.path, url)
    try:
        httpd = ThreadingHTTPServer((host, port), make_handler(backend))
    except OSError as exc:
        lock.release()
        raise DsalError(f"cannot listen on {url}: {exc.strerror}; pick another --port") from None
    failure: list[str] = []

    def connect():
        try:
            studio.connect(backend)
        except DsalError as exc:
            failure.append(str(exc))
            threading.Thread(target=httpd.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():  # `kill PID` stops it like Ctrl-C
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start())
    backend.start([connect] if studio is not None else [])
    log(f"serving {cfg.name} at {url} (round {backend.round}, {backend.model_version()}); Ctrl-C stops it")
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        backend.stop()
        lock.release()
    if failure:
        raise DsalError(failure[0])
