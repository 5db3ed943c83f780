"""A tool-using math agent written against the ``openai`` client only: the example of
``env.agent`` (docs/agents.md; recipe ``grpo_agent_openai``).

It knows nothing of rlpost's training: it gets an ``openai.AsyncOpenAI`` client and a
task row, offers the model a calculator and (when a sandbox service is given) a Python
executor as OpenAI ``tools``, runs each ``tool_calls`` entry and sends the results back
as ``tool`` messages, until the model answers without calling a tool or ``max_turns``
replies have been sampled. It returns None, so the run's ``reward.fn`` scores the final
answer (``\\boxed{}``, ``rlpost.rewards.math``); an agent may return its own reward instead.

The same loop runs unchanged against any OpenAI-compatible server; only the tools'
implementations come from rlpost (``rlpost.tools``: the calculator in process, Python in
the sandbox service, never here).
"""

from __future__ import annotations

import asyncio
import json

import openai

from rlpost.tools import CalculatorTool, PythonTool, tool_schema


def _tools(sandbox_url: str | list[str] | None, python_timeout_s: float) -> dict:
    tools: dict = {"calculator": CalculatorTool()}
    if sandbox_url:
        from rlpost.sandbox.client import shared_client

        tools["python"] = PythonTool(shared_client(sandbox_url), python_timeout_s)
    return tools


async def _run_call(tools: dict, call) -> str:
    tool = tools.get(call.function.name)
    if tool is None:
        return f"Error: no tool named {call.function.name!r}; the tools are {', '.join(tools)}."
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError as exc:
        return f"Error: the arguments are not valid JSON ({exc.msg})."
    # Tools are synchronous (the sandbox client blocks on HTTP): off the event loop, so
    # the other agents in this actor keep running.
    return await asyncio.to_thread(tool, arguments)


async def math_agent(client: openai.AsyncOpenAI, row: dict, sandbox_url: str | list[str] | None = None,
                     max_turns: int = 3, python_timeout_s: float = 5.0) -> None:
    tools = _tools(sandbox_url, python_timeout_s)
    schemas = [tool_schema(t) for t in tools.values()]
    messages = list(row["messages"])
    for _ in range(max_turns):
        try:
            reply = await client.chat.completions.create(model="policy", messages=messages, tools=schemas)
        except openai.BadRequestError as exc:
            if getattr(exc, "code", None) == "context_length_exceeded":
                break  # the conversation filled the context: score what was answered so far
            raise
        message = reply.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            break  # an answer
        for call in message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": await _run_call(tools, call)})
    return None  # reward.fn scores the final reply
