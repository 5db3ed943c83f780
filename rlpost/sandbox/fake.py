"""A stand-in for ``SandboxClient`` for tests of code that *uses* the sandbox (environments,
tools, the multi-turn loop) on hosts without bubblewrap. It runs nothing: answers come
from a function you give it, and every call is recorded."""

from __future__ import annotations

from typing import Callable

from rlpost.sandbox.types import RunResult


class FakeSandboxClient:
    def __init__(self, respond: Callable[[str, str], RunResult] | None = None):
        self._respond = respond or (lambda code, stdin: RunResult("ok", "", "", 0))
        self.calls: list[tuple[str, str, float, int]] = []  # (code, stdin, timeout_s, memory_mb)

    def run(self, code: str, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 256) -> RunResult:
        self.calls.append((code, stdin, timeout_s, memory_mb))
        return self._respond(code, stdin)

    def health(self) -> bool:
        return True
