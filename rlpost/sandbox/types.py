"""What crosses the sandbox's HTTP boundary: a run request, its result, the server's limits.

The wire format is JSON with exactly these field names:
request ``{"code" | "bash", "stdin", "timeout_s", "memory_mb"}`` (a Python program in
``code`` or a bash script in ``bash``), answer ``{"status", "stdout", "stderr", "exit_code"}``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from rlpost.errors import SandboxError

# `ok`: exited 0. `timeout`: wall-clock or CPU-time limit hit. `memory`: the memory limit
# was hit (MemoryError, ENOMEM or the cgroup OOM killer). `error`: anything else,
# including a non-zero exit and output past the output limit.
STATUSES = ("ok", "timeout", "memory", "error")

# The bearer token: the server requires it when set, the client sends it when set.
TOKEN_ENV = "RLPOST_SANDBOX_TOKEN"


@dataclass(frozen=True)
class RunResult:
    """One sandboxed run. ``exit_code`` is the program's exit status, ``128 + N`` when
    a signal ``N`` killed it (shell convention), ``-1`` when it never started."""

    status: str
    stdout: str
    stderr: str
    exit_code: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        try:
            result = cls(str(data["status"]), str(data["stdout"]), str(data["stderr"]), int(data["exit_code"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SandboxError(f"malformed sandbox answer {data!r}: {e}") from e
        if result.status not in STATUSES:
            raise SandboxError(f"sandbox answered unknown status {result.status!r}; expected one of {STATUSES}")
        return result


@dataclass(frozen=True)
class Limits:
    """Server-side caps; a request asking for more is refused (HTTP 400), not clamped,
    so a caller never believes it got a limit it did not get."""

    max_concurrency: int = 4  # runs at once; the next one is answered 429
    max_timeout_s: float = 60.0
    max_memory_mb: int = 4096
    min_memory_mb: int = 32  # the interpreter alone needs ~20 MiB of address space
    output_limit_bytes: int = 64 * 1024  # per stream; past it the run is killed
    max_code_bytes: int = 1 << 20
    max_stdin_bytes: int = 1 << 20
    max_processes: int = 32  # pids cgroup limit and RLIMIT_NPROC of the run's uid
    disk_mb: int = 64  # size of the writable tmpfs (the working directory)
    max_file_mb: int = 16  # RLIMIT_FSIZE
    # Stateful sessions (rlpost.sandbox.sessions): how many may live at once, how long one
    # may sit unused before it is reaped, and what may be uploaded into one at creation.
    max_sessions: int = 64
    session_idle_s: float = 600.0
    max_upload_bytes: int = 4 << 20  # all files' contents together
    max_upload_files: int = 256

    def __post_init__(self) -> None:
        bad = [k for k, v in asdict(self).items() if not v > 0]
        if bad or self.min_memory_mb > self.max_memory_mb:
            raise SandboxError(
                f"sandbox limits must be positive with min_memory_mb <= max_memory_mb; bad: {bad or 'memory range'}"
            )


LANGUAGES = ("python", "bash")


@dataclass(frozen=True)
class RunRequest:
    code: str  # the program text, in ``language``
    stdin: str = ""
    timeout_s: float = 5.0
    memory_mb: int = 256
    language: str = "python"  # "python" (``"code"`` on the wire) or "bash" (``"bash"``)

    @classmethod
    def parse(cls, data: Any, limits: Limits) -> RunRequest:
        """Validate a decoded JSON body; raises ``ValueError`` with a message for the
        HTTP 400 answer."""
        if not isinstance(data, dict):
            raise ValueError("body must be a JSON object")
        unknown = sorted(set(data) - {"code", "bash", "stdin", "timeout_s", "memory_mb"})
        if unknown:
            raise ValueError(f"unknown fields {unknown}; valid: code or bash, stdin, timeout_s, memory_mb")
        if "code" in data and "bash" in data:
            raise ValueError("give either code (a Python program) or bash (a bash script), not both")
        language = "bash" if "bash" in data else "python"
        code, stdin = data.get("bash" if language == "bash" else "code"), data.get("stdin", "")
        if not isinstance(code, str) or not isinstance(stdin, str):
            raise ValueError("code and stdin must be strings (or bash instead of code)")
        if len(code.encode()) > limits.max_code_bytes or len(stdin.encode()) > limits.max_stdin_bytes:
            raise ValueError(f"code and stdin are limited to {limits.max_code_bytes} bytes each")
        timeout_s, memory_mb = data.get("timeout_s", 5.0), data.get("memory_mb", 256)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s):
            raise ValueError("timeout_s must be a number")
        if not 0 < timeout_s <= limits.max_timeout_s:
            raise ValueError(f"timeout_s must be in (0, {limits.max_timeout_s}], got {timeout_s}")
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int):
            raise ValueError("memory_mb must be an integer")
        if not limits.min_memory_mb <= memory_mb <= limits.max_memory_mb:
            raise ValueError(f"memory_mb must be in [{limits.min_memory_mb}, {limits.max_memory_mb}], got {memory_mb}")
        return cls(code, stdin, float(timeout_s), memory_mb, language)

    def to_json(self) -> dict[str, Any]:
        key = "bash" if self.language == "bash" else "code"
        return {key: self.code, "stdin": self.stdin, "timeout_s": self.timeout_s, "memory_mb": self.memory_mb}
