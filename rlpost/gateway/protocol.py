"""The OpenAI wire format: request bodies (pydantic, so a malformed field is a 400
naming it), the error body, and turning a sampled reply into a chat message with
``tool_calls``. No HTTP server here."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlpost.envs.tool_calls import ParseError, parse_tool_calls


class GatewayError(Exception):
    """A request the gateway refuses: answered with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    # Unknown fields (user, presence_penalty, ...) are accepted and ignored, as
    # servers in front of local engines commonly do; the ones that change sampling are typed.
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0)  # only 0: the engines return the sampled token's

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}].role must be system, user, assistant or tool, got {role!r}")
            content = m.get("content")
            parts_ok = isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
            if not (isinstance(content, str) or parts_ok or (content is None and role == "assistant")):
                raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
            for j, call in enumerate(m.get("tool_calls") or []):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ValueError(f"messages[{i}].tool_calls[{j}] needs function.name")
            if role == "developer":  # OpenAI's newer name for system
                m["role"] = "system"
        return messages

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, t in enumerate(tools or []):
            fn = t.get("function")
            if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, choice: str | dict | None) -> str | dict | None:
        # "required" and a named function would need constrained decoding, which the
        # engines do not offer: refused rather than silently ignored.
        if choice not in (None, "auto", "none"):
            raise ValueError(f"tool_choice {choice!r} is not supported; use \"auto\" or \"none\"")
        return choice

    def max_new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=1)
    echo: Literal[False] = False


_CALL_BLOCK = re.compile(r"<tool_call>.*?</tool_call>", re.DOTALL)


def reply_message(text: str, parse_tools: bool) -> tuple[dict[str, Any], str, bool]:
    """(the assistant message, its finish reason override or "", whether a tool call
    was malformed). With ``parse_tools``, ``<tool_call>{json}</tool_call>`` blocks
    become OpenAI ``tool_calls`` and leave ``content``; if any block is malformed the
    whole text is returned as plain content (and counted by the caller)."""
    if not parse_tools:
        return {"role": "assistant", "content": text}, "", False
    calls = parse_tool_calls(text)
    if not calls:
        return {"role": "assistant", "content": text}, "", False
    if any(isinstance(c, ParseError) for c in calls):
        return {"role": "assistant", "content": text}, "", True
    rest = _CALL_BLOCK.sub("", text).strip()
    tool_calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                   "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                  for c in calls if not isinstance(c, ParseError)]
    return {"role": "assistant", "content": rest or None, "tool_calls": tool_calls}, "tool_calls", False
