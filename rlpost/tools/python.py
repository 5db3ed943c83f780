"""A Python executor tool: the model's code runs in the sandbox service, never here."""

from __future__ import annotations

from typing import Any

from rlpost.sandbox.types import RunResult
from rlpost.tools.base import check_arguments, register_tool


def format_result(result: RunResult) -> str:
    """The tool message: stdout, then stderr and the status when something went wrong, so
    the model sees a traceback or a timeout instead of an empty answer."""
    parts = [result.stdout] if result.stdout else []
    if result.stderr:
        parts.append(f"stderr:\n{result.stderr}")
    if result.status != "ok":
        parts.append(f"[status: {result.status}, exit code {result.exit_code}]")
    return "\n".join(p.rstrip("\n") for p in parts) if parts else "(no output)"


@register_tool("python")
class PythonTool:
    """Runs ``code`` with a ``timeout_s`` and ``memory_mb`` chosen by the recipe, not by
    the model. ``client`` is a ``SandboxClient`` (or anything with its ``run``)."""

    name = "python"
    description = (
        "Run a Python 3 program in an isolated sandbox (standard library only, no network, "
        "no files kept between calls) and return what it printed. Use print() to see values."
    )
    parameters = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "description": "a complete Python program"},
            "stdin": {"type": "string", "description": "text given to the program on standard input"},
        },
        "required": ["code"],
        "additionalProperties": False,
    }

    def __init__(self, client: Any, timeout_s: float = 5.0, memory_mb: int = 256):
        self.client, self.timeout_s, self.memory_mb = client, timeout_s, memory_mb

    def __call__(self, arguments: dict[str, Any]) -> str:
        problem = check_arguments(self.parameters, arguments)
        if problem:
            return f"Error: {problem}."
        # SandboxError (service down or overloaded past retries) propagates: it is not
        # the model's mistake and must not be scored as one.
        result = self.client.run(arguments["code"], arguments.get("stdin", ""), self.timeout_s, self.memory_mb)
        return format_result(result)
