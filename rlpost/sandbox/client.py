"""Client of the sandbox service: the only way environments and tools run code.

Give ``url`` one server, a load balancer in front of a fleet, or a list of servers: a run
holds no server-side state, so any server may answer any request. With a list the client
spreads requests itself (``Fleet``). A session (``open_session``) does hold state, so it
is created on one server (chosen like a run's) and every later call of it goes there.
Stdlib HTTP only.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Sequence

from rlpost.errors import SandboxError
from rlpost.sandbox.types import TOKEN_ENV, RunRequest, RunResult

# Overload and server faults are worth retrying; other 4xx mean the request itself is wrong.
_RETRY_STATUS = {429, 500, 502, 503, 504}


class Fleet:
    """Which server gets the next request. Least busy first: fewest requests this client
    has in flight there, ties taken in turn. A server that fails (connection error, 5xx)
    is ejected for ``eject_s``; one that answers 429 is set aside for its ``Retry-After``.
    When its time is up it gets traffic again and is ejected again if it still fails
    (a passive health check: no probe traffic). With every server set aside, the one
    back soonest is used, so a single server behaves as before."""

    def __init__(self, urls: Sequence[str], eject_s: float, clock: Callable[[], float] = time.monotonic):
        if not urls:
            raise SandboxError("SandboxClient needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.eject_s, self._clock = eject_s, clock
        self._inflight = dict.fromkeys(self.urls, 0)
        self._away_until = dict.fromkeys(self.urls, 0.0)
        self._turn = 0
        self._lock = threading.Lock()
        self.ejections = 0  # servers ejected over this client's life, for logs and tests

    def acquire(self, avoid: str = "") -> str:
        """The server for the next request, other than ``avoid`` (the one that just
        failed it) when another is available."""
        with self._lock:
            now, n = self._clock(), len(self.urls)
            order = [self.urls[(self._turn + i) % n] for i in range(n)]
            self._turn += 1
            up = [u for u in order if self._away_until[u] <= now and u != avoid]
            up = up or [u for u in order if self._away_until[u] <= now]
            url = min(up, key=self._inflight.__getitem__) if up else min(order, key=self._away_until.__getitem__)
            self._inflight[url] += 1
            return url

    def release(self, url: str) -> None:
        with self._lock:
            self._inflight[url] -= 1

    def set_aside(self, url: str, seconds: float, failed: bool) -> None:
        with self._lock:
            self._away_until[url] = max(self._away_until[url], self._clock() + seconds)
            self.ejections += failed

    def other_available(self, url: str) -> bool:
        with self._lock:
            now = self._clock()
            return any(t <= now for u, t in self._away_until.items() if u != url)


class SandboxClient:
    """``run`` sends one program and returns its ``RunResult``; a program that times out,
    runs out of memory or crashes is a result, never an exception. ``SandboxError`` is
    raised only when the service is unusable: unreachable or overloaded after ``retries``
    retries, or refusing the request (HTTP 4xx other than 429: a limit above the server's,
    401 a missing or wrong token). A retry goes at once to another server when one is
    available (see ``Fleet``); otherwise it waits with exponential backoff (base
    ``backoff_s``, capped at ``max_backoff_s``, jittered, never shorter than a 429's
    ``Retry-After``). Each HTTP call waits at most ``timeout_s`` beyond twice the run's
    own timeout (a wait in the server's queue, bounded by it, then the run). ``token`` (default: ``$RLPOST_SANDBOX_TOKEN``) is sent as a bearer token.
    Thread-safe: one client may serve many concurrent episodes."""

    def __init__(
        self,
        url: str | Sequence[str] = "http://127.0.0.1:8900",
        *,
        token: str | None = None,
        retries: int = 3,
        timeout_s: float = 10.0,
        backoff_s: float = 0.2,
        max_backoff_s: float = 2.0,
        eject_s: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.fleet = Fleet([url] if isinstance(url, str) else list(url), eject_s)
        self.url = self.fleet.urls[0]
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.retries, self.timeout_s = retries, timeout_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._sleep = sleep
        self.retried = 0  # retries made over this client's life, for logs and tests

    def run(self, code: str, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 256) -> RunResult:
        body = {"code": code, "stdin": stdin, "timeout_s": timeout_s, "memory_mb": memory_mb}
        # The server may hold a request in its queue for up to timeout_s before running it
        # for up to timeout_s; a shorter HTTP timeout would eject a healthy, busy server.
        return RunResult.from_json(self._request("/run", body, http_timeout=2 * timeout_s + self.timeout_s)[1])

    def run_bash(self, script: str, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 256) -> RunResult:
        """``run`` for a bash script (in a fresh working directory holding only the script, main.sh)."""
        body = {"bash": script, "stdin": stdin, "timeout_s": timeout_s, "memory_mb": memory_mb}
        return RunResult.from_json(self._request("/run", body, http_timeout=2 * timeout_s + self.timeout_s)[1])

    def open_session(self, files: dict[str, str] | None = None) -> SandboxSession:
        """A new session whose workspace holds ``files`` ({relative path: text}); the
        server is picked as for a run (with retries and fail-over), and the session's
        calls all go to it. Delete it with ``close()`` (or use it as a context manager);
        a forgotten one is reaped after the server's ``--session-idle-s``."""
        url, answer = self._request("/sessions", {"files": files or {}}, http_timeout=self.timeout_s)
        try:
            # A server behind a load balancer names its own address ("url"), so the
            # session's calls reach the server that holds it.
            return SandboxSession(self, str(answer.get("url") or url).rstrip("/"), str(answer["session_id"]))
        except (KeyError, TypeError) as e:
            raise SandboxError(f"malformed session answer from {url}: {answer!r}") from e

    def health(self) -> bool:
        """True when at least one server answers its health check now (no retries)."""
        return any(self._healthy(url) for url in self.fleet.urls)

    def _healthy(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=self.timeout_s) as r:
                return r.status == 200 and json.load(r).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _backoff(self, attempt: int, wait_at_least: float) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        # jitter spreads a burst's retries; a 429's Retry-After is a floor.
        self._sleep(max(delay * random.uniform(0.5, 1.0), wait_at_least))

    def _request(self, path: str, body: dict, http_timeout: float) -> tuple[str, dict]:
        """POST to the fleet with retries and fail-over; ``(server url, answer)``."""
        data = json.dumps(body).encode()
        headers = self._headers()
        last, wait_at_least, failed_url = "", 0.0, ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                if not self.fleet.other_available(failed_url):  # else another server takes it at once
                    self._backoff(attempt, wait_at_least)
            url = self.fleet.acquire(avoid=failed_url)
            req = urllib.request.Request(url + path, data=data, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=http_timeout) as r:
                    return url, json.load(r)
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if e.code not in _RETRY_STATUS:
                    hint = " (set RLPOST_SANDBOX_TOKEN or the client's token)" if e.code == 401 else ""
                    raise SandboxError(f"sandbox at {url} refused the request (HTTP {e.code}){hint}: {detail}") from e
                last, wait_at_least, failed_url = f"HTTP {e.code}: {detail}", _retry_after(e), url
                if e.code == 429:
                    self.fleet.set_aside(url, wait_at_least, failed=False)
                else:
                    self.fleet.set_aside(url, self.fleet.eject_s, failed=True)
            # refused, reset, timed out, cut off mid-answer (IncompleteRead is an HTTPException), bad JSON
            except (OSError, ValueError, http.client.HTTPException) as e:
                last, wait_at_least, failed_url = f"{type(e).__name__}: {e}", 0.0, url
                self.fleet.set_aside(url, self.fleet.eject_s, failed=True)
            finally:
                self.fleet.release(url)
        where = failed_url if len(self.fleet.urls) == 1 else f"{self.fleet.urls} (last {failed_url})"
        raise SandboxError(f"sandbox at {where} failed after {self.retries + 1} attempts; last error {last}")


class SandboxSession:
    """A live session on one server: ``run`` a Python program or a bash script in its
    workspace, whose files persist from call to call, then ``close``.

    A session call is not safe to repeat (it may have changed files), so it is retried
    only when the server says it did not run it: 429 (queue full), with backoff, up to
    the client's ``retries``. Anything else (the server gone, the session reaped: 404)
    raises ``SandboxError``; the episode using it fails and is retried from scratch."""

    def __init__(self, client: SandboxClient, url: str, session_id: str):
        self.client, self.url, self.id = client, url, session_id
        self.closed = False

    def run(self, code: str | None = None, *, bash: str | None = None, stdin: str = "", timeout_s: float = 5.0,
            memory_mb: int = 256) -> RunResult:
        if (code is None) == (bash is None):
            raise ValueError("give exactly one of code (a Python program) or bash (a bash script)")
        text, language = (code, "python") if code is not None else (bash or "", "bash")
        request = RunRequest(text, stdin, timeout_s, memory_mb, language)
        answer = self._call("POST", f"/sessions/{self.id}/run", request.to_json(), 2 * timeout_s + self.client.timeout_s)
        return RunResult.from_json(answer)

    def close(self) -> None:
        """Delete the session and its files; a second close, or one after the session was
        reaped or its server died, does nothing."""
        if self.closed:
            return
        self.closed = True
        try:
            self._call("DELETE", f"/sessions/{self.id}", None, self.client.timeout_s)
        except SandboxError:
            pass  # gone already: reaped, or its server is down (and the session with it)

    def __enter__(self) -> SandboxSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict | None, http_timeout: float) -> dict:
        client = self.client
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(client.retries + 1):
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=client._headers())
            try:
                with urllib.request.urlopen(req, timeout=http_timeout) as r:
                    return json.load(r)
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if e.code != 429 or attempt == client.retries:
                    raise SandboxError(f"sandbox session {self.id} at {self.url}: HTTP {e.code}: {detail}") from e
                client.retried += 1
                client._backoff(attempt + 1, _retry_after(e))
            except (OSError, ValueError, http.client.HTTPException) as e:
                raise SandboxError(f"sandbox session {self.id} at {self.url}: {type(e).__name__}: {e}") from e
        raise AssertionError("unreachable")


_SHARED: dict[tuple[str, ...], SandboxClient] = {}
_SHARED_LOCK = threading.Lock()


def shared_client(url: str | Sequence[str]) -> SandboxClient:
    """One client per process and server list, with default settings. Environments are
    built once per episode; sharing the client lets every episode in an env actor see
    the same in-flight counts and ejections, so a dead server is tried once, not once
    per episode."""
    key = (url,) if isinstance(url, str) else tuple(url)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = SandboxClient(list(key))
        return _SHARED[key]


def _retry_after(e: urllib.error.HTTPError) -> float:
    try:
        return min(float(e.headers.get("Retry-After", 0)), 30.0)
    except (TypeError, ValueError):
        return 0.0
