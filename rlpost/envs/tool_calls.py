"""Tool calls in model output: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(Qwen2.5/Hermes style), and running them against an environment's tools.

A malformed call (bad JSON, no name, arguments not an object, an unknown tool, an
unclosed tag) is not an episode failure: the model made a mistake, so it gets an
error message back as the tool's observation and may try again on its next turn.
A ``SandboxError`` (the service is down) is not the model's mistake: it propagates
and fails the episode, which is retried or dropped, never scored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from rlpost.envs.base import Message
from rlpost.errors import SandboxError

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParseError:
    message: str  # what was wrong, phrased for the model to read


def parse_tool_calls(text: str) -> list[ToolCall | ParseError]:
    """Every ``<tool_call>`` block in ``text``, in order; [] when there is none."""
    out: list[ToolCall | ParseError] = []
    for body in _CALL.findall(text):
        out.append(_parse_one(body.strip()))
    # An opening tag with no closing one after it (the model stopped mid-call).
    if text.count(_OPEN) > text.count(_CLOSE):
        out.append(ParseError("a <tool_call> tag was not closed with </tool_call>"))
    return out


def _parse_one(body: str) -> ToolCall | ParseError:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return ParseError(f"the tool call is not valid JSON ({exc.msg} at char {exc.pos})")
    if not isinstance(obj, dict):
        return ParseError("the tool call must be a JSON object with \"name\" and \"arguments\"")
    name, arguments = obj.get("name"), obj.get("arguments", {})
    if not isinstance(name, str) or not name:
        return ParseError("the tool call has no \"name\" string")
    if isinstance(arguments, str):  # some models emit the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ParseError(f"the \"arguments\" of {name!r} must be a JSON object")
    return ToolCall(name, arguments)


def run_tool_calls(text: str, tools: list) -> list[Message] | None:
    """Tool messages answering the calls in ``text`` (results or error messages), or
    None when ``text`` calls no tool (the model has answered)."""
    calls = parse_tool_calls(text)
    if not calls:
        return None
    by_name = {t.name: t for t in tools}
    messages = []
    for call in calls:
        if isinstance(call, ParseError):
            content = f"Error: {call.message}."
        elif call.name not in by_name:
            content = f"Error: unknown tool {call.name!r}; available tools: {sorted(by_name)}."
        else:
            try:
                content = str(by_name[call.name](call.arguments))
            except SandboxError:
                raise  # infrastructure, not the model's mistake: the episode fails and is retried
            except Exception as exc:  # a tool's own bug is the model's observation
                content = f"Error: tool {call.name!r} failed: {type(exc).__name__}: {exc}"
        messages.append({"role": "tool", "content": content})
    return messages
