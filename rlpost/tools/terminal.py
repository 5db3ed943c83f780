"""A terminal tool: the model's shell commands run in one sandbox session, whose files
persist for the whole episode (``rlpost.sandbox.client.SandboxSession``)."""

from __future__ import annotations

from typing import Any

from rlpost.tools.base import check_arguments, register_tool
from rlpost.tools.python import format_result


@register_tool("terminal")
class TerminalTool:
    """Runs ``command`` with bash in the episode's session. ``session`` is a
    ``SandboxSession`` (or anything with its ``run``); the environment opens it at reset
    and closes it at the end. ``timeout_s`` and ``memory_mb`` are the recipe's, not the
    model's."""

    name = "terminal"
    description = (
        "Run a bash command in your working directory (a Linux shell with Python 3 and its standard library, "
        "no network) and return its output. Files you create or change stay for later commands."
    )
    parameters = {
        "type": "object",
        "properties": {"command": {"type": "string", "description": "e.g. cat main.py && python3 -m unittest"}},
        "required": ["command"],
        "additionalProperties": False,
    }

    def __init__(self, session: Any, timeout_s: float = 10.0, memory_mb: int = 256):
        self.session, self.timeout_s, self.memory_mb = session, timeout_s, memory_mb

    def __call__(self, arguments: dict[str, Any]) -> str:
        problem = check_arguments(self.parameters, arguments)
        if problem:
            return f"Error: {problem}."
        # SandboxError (service down, session reaped) propagates: the episode fails and is
        # retried, never scored as the model's mistake.
        result = self.session.run(bash=arguments["command"], timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return format_result(result)
