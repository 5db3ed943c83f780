"""Client of the sandbox service: the only way environments and tools run code.

Point ``url`` at one server, or at a load balancer in front of a fleet (a run holds no
server-side state, so any server may answer any request). Stdlib HTTP only.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from typing import Callable

from rlpost.errors import SandboxError
from rlpost.sandbox.types import RunResult

# Overload and server faults are worth retrying; other 4xx mean the request itself is wrong.
_RETRY_STATUS = {429, 500, 502, 503, 504}


class SandboxClient:
    """``run`` sends one program and returns its ``RunResult``; a program that times out,
    runs out of memory or crashes is a result, never an exception. ``SandboxError`` is
    raised only when the service is unusable: unreachable or overloaded after ``retries``
    retries with exponential backoff (base ``backoff_s``, capped at ``max_backoff_s``,
    jittered, never shorter than a 429's ``Retry-After``), or refusing the request
    (HTTP 4xx other than 429, e.g. a limit above the server's). Each HTTP call waits at most ``timeout_s`` beyond the run's own timeout."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8900",
        *,
        retries: int = 3,
        timeout_s: float = 10.0,
        backoff_s: float = 0.2,
        max_backoff_s: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.url = url.rstrip("/")
        self.retries, self.timeout_s = retries, timeout_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._sleep = sleep
        self.retried = 0  # retries made over this client's life, for logs and tests

    def run(self, code: str, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 256) -> RunResult:
        body = {"code": code, "stdin": stdin, "timeout_s": timeout_s, "memory_mb": memory_mb}
        return RunResult.from_json(self._request("/run", body, http_timeout=timeout_s + self.timeout_s))

    def health(self) -> bool:
        """True when the service answers its health check now (no retries)."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=self.timeout_s) as r:
                return r.status == 200 and json.load(r).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def _request(self, path: str, body: dict, http_timeout: float) -> dict:
        data = json.dumps(body).encode()
        last, wait_at_least = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                # jitter spreads a burst's retries; a 429's Retry-After is a floor.
                self._sleep(max(delay * random.uniform(0.5, 1.0), wait_at_least))
            req = urllib.request.Request(
                self.url + path, data=data, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=http_timeout) as r:
                    return json.load(r)
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if e.code not in _RETRY_STATUS:
                    raise SandboxError(f"sandbox at {self.url} refused the request (HTTP {e.code}): {detail}") from e
                last, wait_at_least = f"HTTP {e.code}: {detail}", _retry_after(e)
            except (OSError, ValueError) as e:  # refused, reset, timed out, truncated JSON
                last, wait_at_least = f"{type(e).__name__}: {e}", 0.0
        raise SandboxError(f"sandbox at {self.url} failed after {self.retries + 1} attempts; last error {last}")


def _retry_after(e: urllib.error.HTTPError) -> float:
    try:
        return min(float(e.headers.get("Retry-After", 0)), 30.0)
    except (TypeError, ValueError):
        return 0.0
