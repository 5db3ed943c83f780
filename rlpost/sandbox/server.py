"""The sandbox HTTP service.

    POST /run     {"code", "stdin", "timeout_s", "memory_mb"}
                  -> 200 {"status", "stdout", "stderr", "exit_code"}
                  -> 400 bad request, 401 missing or wrong token, 413 body too large,
                     429 queue full or no slot within the wait (Retry-After), 500 internal
    GET  /health  -> 200 {"status": "ok", "busy", "queued", "capacity", "rejected", "served", ...}
    GET  /metrics -> 200 Prometheus text format (401 without the token, when one is set)
    POST   /sessions          {"files": {path: text}}  -> 201 {"session_id", "idle_s", "url"}
    POST   /sessions/ID/run   as POST /run, in the session's workspace (404 gone, 409 busy)
    DELETE /sessions/ID       -> 200 {"deleted": ID}

Sessions (``rlpost.sandbox.sessions``) keep a workspace across runs; their runs take a
slot through the same queue, under the same limits and the same token.

A stdlib ``ThreadingHTTPServer``: one thread per connection, while a pool of slots
(``Limits.max_concurrency``) bounds how many programs run at once. A request finding no
free slot waits in a bounded FIFO queue (``rlpost.sandbox.admission``) for at most
``max_queue_wait_s`` and never past its own ``timeout_s``; only a full queue or an
expired wait is answered 429, so a burst a little wider than the slots is absorbed here
rather than bounced to every client's backoff. Every request gets exactly one answer.

With a token set, ``/run`` and ``/metrics`` need ``Authorization: Bearer TOKEN``
(compared in constant time); ``/health`` stays open for load-balancer probes and shows
only counters. A server bound beyond loopback refuses to start without a token.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rlpost.errors import SandboxError
from rlpost.sandbox.admission import QUEUE_FULL, WAIT_EXPIRED, SlotPool
from rlpost.sandbox.metrics import Metrics
from rlpost.sandbox.runner import BASE_UID, Sandbox
from rlpost.sandbox.sessions import Session, SessionBusy, SessionGone, SessionsFull, SessionStore, UploadError, check_files
from rlpost.sandbox.types import Limits, RunRequest


class SandboxHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog. socketserver's default of 5 overflows under a burst of a few
    # dozen connects, and the kernel then resets connections the client already sent
    # its request on: a request answered by nobody. (The kernel caps it at somaxconn.)
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int],
        sandbox: Sandbox,
        *,
        max_queue: int = 0,
        max_queue_wait_s: float = 30.0,
        token: str | None = None,
        advertise_url: str | None = None,
    ):
        super().__init__(address, _Handler)
        self.advertise_url = advertise_url
        self.sandbox = sandbox
        self.pool = SlotPool(sandbox.limits.max_concurrency, max_queue)
        self.max_queue_wait_s = max_queue_wait_s
        self.token = token.encode() if token else None
        self.metrics = Metrics()
        # Session uids follow the slot uids: base_uid + capacity + session index.
        self.sessions = SessionStore(sandbox.limits, sandbox.base_uid + self.pool.capacity if sandbox.drop_uid else None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (reset, broken pipe) is its own business, not a traceback on stderr.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        given = (header or "").removeprefix("Bearer ").encode()
        return hmac.compare_digest(given, self.token)  # constant time: no timing oracle on the token

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the queue ahead drained at the mean run time."""
        busy, queued = self.pool.usage()
        hist = self.metrics.run_seconds
        mean = hist.total / hist.n if hist.n else 1.0
        return max(1, math.ceil(mean * (queued + 1) / self.pool.capacity))

    def health(self) -> dict[str, Any]:
        busy, queued = self.pool.usage()
        return {"status": "ok", "capacity": self.pool.capacity, "max_queue": self.pool.max_queue, "busy": busy,
                "queued": queued, "sessions": self.sessions.count(), "max_sessions": self.sandbox.limits.max_sessions,
                **self.metrics.summary(), **self.sandbox.describe(), **self.sessions.describe()}


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

    def _reply_text(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refuse_unauthorized(self) -> bool:
        if self.server.authorized(self.headers.get("Authorization")):
            return False
        self.server.metrics.outcome("unauthorized")
        self.close_connection = True  # a POST body stays unread
        self._reply(401, {"error": "missing or wrong bearer token (Authorization: Bearer ...)"},
                    {"WWW-Authenticate": "Bearer"})
        return True

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path == "/health":
            self._reply(200, self.server.health())
        elif self.path == "/metrics":
            if not self._refuse_unauthorized():
                busy, queued = self.server.pool.usage()
                store = self.server.sessions
                self._reply_text(200, self.server.metrics.prometheus(
                    busy, queued, self.server.pool.capacity, self.server.pool.max_queue,
                    (store.count(), store.limits.max_sessions, dict(store.events))))
        else:
            self._reply(404, {"error": f"no route GET {self.path}; try GET /health, GET /metrics or POST /run"})

    def do_POST(self) -> None:  # noqa: N802
        parts = self.path.strip("/").split("/")
        if parts == ["run"]:
            route = self._run
        elif parts == ["sessions"]:
            route = self._create_session
        elif len(parts) == 3 and parts[0] == "sessions" and parts[2] == "run":
            route = lambda: self._run(parts[1])  # noqa: E731
        else:
            self._reply(404, {"error": f"no route POST {self.path}; try POST /run, POST /sessions "
                                       "or POST /sessions/ID/run"})
            return
        if not self._refuse_unauthorized():
            route()

    def do_DELETE(self) -> None:  # noqa: N802
        parts = self.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "sessions":
            self._reply(404, {"error": f"no route DELETE {self.path}; try DELETE /sessions/ID"})
            return
        if self._refuse_unauthorized():
            return
        try:
            self.server.sessions.delete(parts[1])
        except SessionGone as e:
            self._reply(404, {"error": str(e)})
            return
        self._reply(200, {"deleted": parts[1]})

    def _read_json(self, max_bytes: int) -> Any:
        """The decoded body, or ``_NO_BODY`` after answering 400/413 (counted)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self.server.metrics.outcome("bad_request")
            self._reply(400, {"error": "a valid Content-Length header is required"})
            return _NO_BODY
        if length > max_bytes:
            self.close_connection = True  # the body stays unread
            self.server.metrics.outcome("bad_request")
            self._reply(413, {"error": f"body of {length} bytes is too large (at most {max_bytes})"})
            return _NO_BODY
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            self.server.metrics.outcome("bad_request")
            self._reply(400, {"error": f"body is not JSON: {e}"})
            return _NO_BODY

    def _create_session(self) -> None:
        limits = self.server.sandbox.limits
        # JSON may spell a character in up to 6 bytes (\u00e9); the decoded files are then
        # held to the upload limit itself.
        data = self._read_json(6 * limits.max_upload_bytes + 64 * limits.max_upload_files + 4096)
        if data is _NO_BODY:
            return
        try:
            if not isinstance(data, dict) or set(data) - {"files"}:
                raise UploadError("body must be a JSON object with at most the field files: {path: text}")
            session = self.server.sessions.create(check_files(data.get("files"), limits))
        except UploadError as e:
            self.server.metrics.outcome("bad_request")
            self._reply(400, {"error": str(e)})
            return
        except SessionsFull as e:
            # Sessions end as episodes end; the client retries after Retry-After.
            self._reply(429, {"error": f"{e}; delete finished sessions or raise --max-sessions"},
                        {"Retry-After": "5"})
            return
        # url: where the session's calls must go. Behind a load balancer (a Kubernetes
        # Service) the next connection may reach another server, which does not have it.
        self._reply(201, {"session_id": session.id, "idle_s": limits.session_idle_s, "url": self.server.advertise_url})

    def _run(self, session_id: str | None = None) -> None:
        metrics = self.server.metrics
        limits = self.server.sandbox.limits
        data = self._read_json(2 * (limits.max_code_bytes + limits.max_stdin_bytes) + 4096)
        if data is _NO_BODY:
            return
        try:
            request = RunRequest.parse(data, limits)
        except ValueError as e:
            metrics.outcome("bad_request")
            self._reply(400, {"error": str(e)})
            return
        session: Session | None = None
        if session_id is not None:
            try:
                session = self.server.sessions.checkout(session_id)
            except (SessionGone, SessionBusy) as e:
                gone = isinstance(e, SessionGone)
                metrics.outcome("no_session" if gone else "session_busy")
                self._reply(404 if gone else 409, {"error": str(e)})
                return
        try:
            code, body, headers = self._run_in_slot(request, session)
        finally:
            closed = self.server.sessions.checkin(session) if session is not None else None
        if closed and code == 200:  # the run itself broke the session's disk cap
            body = {**body, "status": "error", "stderr": body["stderr"] + f"[sandbox] {closed}\n"}
        self._reply(code, body, headers)

    def _run_in_slot(self, request: RunRequest, session: Session | None) -> tuple[int, dict, dict]:
        """Wait for a slot, run, count: the answer to send."""
        metrics = self.server.metrics
        queued_at = time.monotonic()
        slot = self.server.pool.acquire(min(self.server.max_queue_wait_s, request.timeout_s))
        if slot in (QUEUE_FULL, WAIT_EXPIRED):
            metrics.outcome(str(slot))
            why = "the queue is full" if slot == QUEUE_FULL else "no slot freed up within the request's wait"
            return 429, {"error": f"all sandbox slots are busy and {why}"}, {"Retry-After": str(self.server.retry_after_s())}
        assert isinstance(slot, int)
        started = time.monotonic()
        try:
            if session is None:
                result = self.server.sandbox.run(request, slot)
            else:
                result = self.server.sandbox.run(request, slot, session.workspace, session.uid)
        except Exception as e:  # noqa: BLE001 - an infrastructure fault is a 500, the client retries
            metrics.outcome("internal_error")
            return 500, {"error": f"{type(e).__name__}: {e}"}, {}
        finally:
            self.server.pool.release(slot)
        metrics.ran(result.status, time.monotonic() - started, started - queued_at)
        return 200, result.to_json(), {}


_NO_BODY = object()  # _read_json already answered


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def serve(
    host: str = "127.0.0.1",
    port: int = 8900,
    limits: Limits = Limits(),
    python: str | None = None,
    base_uid: int = BASE_UID,
    *,
    max_queue: int = 32,
    max_queue_wait_s: float = 30.0,
    token: str | None = None,
    advertise_url: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. Prints ``listening on http://HOST:PORT`` once ready
    (the real port when ``port=0``). Refuses to bind beyond loopback without a token."""
    if not token and not is_loopback(host):
        raise SandboxError(
            f"refusing to serve on {host} without a token: anyone who reaches the port could run code. "
            "Set RLPOST_SANDBOX_TOKEN or pass --token-file PATH (clients send it as a bearer token), "
            "or bind to 127.0.0.1."
        )
    if max_queue < 0 or not max_queue_wait_s > 0:
        raise SandboxError(f"max_queue must be >= 0 and max_queue_wait_s > 0, got {max_queue}, {max_queue_wait_s}")
    sandbox = Sandbox(limits, python, base_uid)
    check = sandbox.run(RunRequest("print(6 * 7)", timeout_s=10.0))
    if check.status != "ok" or check.stdout != "42\n":
        raise SandboxError(f"the sandbox cannot run a trivial program on this host: {check}")
    httpd = SandboxHTTPServer((host, port), sandbox, max_queue=max_queue, max_queue_wait_s=max_queue_wait_s,
                              token=token, advertise_url=advertise_url)
    httpd.sessions.start_reaper()
    # shutdown() must come from another thread than serve_forever's.
    stop = lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening on http://{host}:{httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        httpd.sessions.close()  # unmounts and removes every workspace


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
