"""Code sandbox: an HTTP service that runs untrusted Python under bubblewrap with
time, memory, process, output and disk limits and no network, and its client.

    python -m rlpost.sandbox serve --host 127.0.0.1 --port 8900
    SandboxClient("http://127.0.0.1:8900").run("print(1 + 1)")  # RunResult(status="ok", ...)

See docs/sandbox.md for the API, the limits and the isolation model. The server side
(``rlpost.sandbox.server``, ``rlpost.sandbox.runner``) is Linux-only and needs ``bwrap``;
the client and the fake are plain Python.
"""

from rlpost.sandbox.client import SandboxClient, SandboxSession
from rlpost.sandbox.fake import FakeSandboxClient, FakeSandboxSession
from rlpost.sandbox.types import STATUSES, Limits, RunRequest, RunResult

__all__ = ["STATUSES", "FakeSandboxClient", "FakeSandboxSession", "Limits", "RunRequest", "RunResult", "SandboxClient",
           "SandboxSession"]
