"""A stand-in for ``SandboxClient`` for tests of code that *uses* the sandbox (environments,
tools, the multi-turn loop) on hosts without bubblewrap. It runs nothing: answers come
from a function you give it, and every call is recorded."""

from __future__ import annotations

from typing import Callable

from rlpost.sandbox.types import RunResult


class FakeSandboxSession:
    """What ``FakeSandboxClient.open_session`` returns: ``files`` is the upload (a dict the
    responder may change, standing in for the workspace), ``calls`` the runs, in order, as
    ``(language, code)``."""

    def __init__(self, files: dict[str, str], respond: Callable[[dict[str, str], str, str], RunResult]):
        self.files, self._respond = dict(files), respond
        self.calls: list[tuple[str, str]] = []
        self.closed = False

    def run(self, code: str | None = None, *, bash: str | None = None, stdin: str = "", timeout_s: float = 5.0,
            memory_mb: int = 256) -> RunResult:
        if (code is None) == (bash is None):
            raise ValueError("give exactly one of code (a Python program) or bash (a bash script)")
        language, text = ("python", code or "") if bash is None else ("bash", bash)
        self.calls.append((language, text))
        return self._respond(self.files, language, text)

    def close(self) -> None:
        self.closed = True


class FakeSandboxClient:
    def __init__(self, respond: Callable[[str, str], RunResult] | None = None,
                 respond_session: Callable[[dict[str, str], str, str], RunResult] | None = None):
        """``respond(code, stdin)`` answers ``run``; ``respond_session(files, language,
        code)`` answers a session's runs."""
        self._respond = respond or (lambda code, stdin: RunResult("ok", "", "", 0))
        self._respond_session = respond_session or (lambda files, language, code: RunResult("ok", "", "", 0))
        self.calls: list[tuple[str, str, float, int]] = []  # (code, stdin, timeout_s, memory_mb)
        self.sessions: list[FakeSandboxSession] = []

    def run(self, code: str, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 256) -> RunResult:
        self.calls.append((code, stdin, timeout_s, memory_mb))
        return self._respond(code, stdin)

    def open_session(self, files: dict[str, str] | None = None) -> FakeSandboxSession:
        session = FakeSandboxSession(files or {}, self._respond_session)
        self.sessions.append(session)
        return session

    def health(self) -> bool:
        return True
