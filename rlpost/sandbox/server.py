"""The sandbox HTTP service.

    POST /run     {"code", "stdin", "timeout_s", "memory_mb"}
                  -> 200 {"status", "stdout", "stderr", "exit_code"}
                  -> 400 bad request, 413 body too large, 429 all slots busy, 500 internal
    GET  /health  -> 200 {"status": "ok", "busy", "capacity", "rejected", "served", ...}

A stdlib ``ThreadingHTTPServer``: one thread per connection, while a pool of slots
(``Limits.max_concurrency``) bounds how many programs run at once. A request finding no
free slot is answered 429 at once rather than queued, so the client's backoff, not the
server's memory, absorbs bursts, and a fleet behind a load balancer sheds load evenly.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rlpost.errors import SandboxError
from rlpost.sandbox.runner import BASE_UID, Sandbox
from rlpost.sandbox.types import Limits, RunRequest


class SandboxHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], sandbox: Sandbox):
        super().__init__(address, _Handler)
        self.sandbox = sandbox
        self.slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(sandbox.limits.max_concurrency):
            self.slots.put(slot)
        self.lock = threading.Lock()
        self.counters = {"busy": 0, "served": 0, "rejected": 0}

    def count(self, key: str, delta: int = 1) -> None:
        with self.lock:
            self.counters[key] += delta

    def health(self) -> dict[str, Any]:
        with self.lock:
            counters = dict(self.counters)
        return {"status": "ok", "capacity": self.sandbox.limits.max_concurrency, **counters, **self.sandbox.describe()}


class _Handler(BaseHTTPRequestHandler):
    server: SandboxHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per request on stderr would drown the caller's logs

    def _reply(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path == "/health":
            self._reply(200, self.server.health())
        else:
            self._reply(404, {"error": f"no route GET {self.path}; try GET /health or POST /run"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/run":
            self._reply(404, {"error": f"no route POST {self.path}; try POST /run"})
            return
        limits = self.server.sandbox.limits
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._reply(400, {"error": "a valid Content-Length header is required"})
            return
        if length > 2 * (limits.max_code_bytes + limits.max_stdin_bytes) + 4096:
            self.close_connection = True  # the body stays unread
            self._reply(413, {"error": f"body of {length} bytes is too large"})
            return
        try:
            request = RunRequest.parse(json.loads(self.rfile.read(length) or b"null"), limits)
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            self._reply(400, {"error": str(e)})
            return
        try:
            slot = self.server.slots.get_nowait()
        except queue.Empty:
            self.server.count("rejected")
            self._reply(429, {"error": "all sandbox slots are busy"}, {"Retry-After": "1"})
            return
        self.server.count("busy")
        try:
            result = self.server.sandbox.run(request, slot)
        except Exception as e:  # noqa: BLE001 - an infrastructure fault is a 500, the client retries
            self._reply(500, {"error": f"{type(e).__name__}: {e}"})
            return
        finally:
            self.server.count("busy", -1)
            self.server.slots.put(slot)
        self.server.count("served")
        self._reply(200, result.to_json())


def serve(
    host: str = "127.0.0.1",
    port: int = 8900,
    limits: Limits = Limits(),
    python: str | None = None,
    base_uid: int = BASE_UID,
) -> None:
    """Serve until SIGTERM/SIGINT. Prints ``listening on http://HOST:PORT`` once ready
    (the real port when ``port=0``)."""
    sandbox = Sandbox(limits, python, base_uid)
    check = sandbox.run(RunRequest("print(6 * 7)", timeout_s=10.0))
    if check.status != "ok" or check.stdout != "42\n":
        raise SandboxError(f"the sandbox cannot run a trivial program on this host: {check}")
    httpd = SandboxHTTPServer((host, port), sandbox)
    # shutdown() must come from another thread than serve_forever's.
    stop = lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening on http://{host}:{httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


def start_local(
    port: int = 0, *, env: dict[str, str] | None = None, args: list[str] = ()
) -> tuple[subprocess.Popen, str]:
    """Start ``python -m rlpost.sandbox serve`` on loopback in a subprocess and return
    ``(process, url)`` once it serves. Stop it with ``stop_local(process)``. ``port=0``
    lets the server pick a free port and report it, so there is no race for the port."""
    cmd = [sys.executable, "-m", "rlpost.sandbox", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env if env is not None else dict(os.environ), text=True)
    line = proc.stdout.readline()  # blocks until the self-check passed or the server died
    if not line.startswith("listening on "):
        proc.wait(timeout=10)
        raise SandboxError(f"sandbox server exited with code {proc.returncode} before serving (its stderr says why)")
    return proc, line.split()[-1]


def stop_local(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM the server by pid, then SIGKILL if it does not exit in ``timeout_s``."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
