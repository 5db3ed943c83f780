"""Math word problems with tools: the model may call a calculator (and, when a
sandbox service is given, a Python executor) before it answers in ``\\boxed{}``.

Turns: the model either calls tools (``<tool_call>{...}</tool_call>``; the results
come back as tool messages, malformed calls as error messages) or answers. An answer
(a turn with no tool call) ends the episode and is scored with
``rlpost.rewards.math.math_reward`` (``accuracy`` 1/0). Running out of turns while
still calling tools scores 0. Tasks are the built-in math problems
(``data.source=builtin``) or any dataset with prompt/answer columns.
"""

from __future__ import annotations

from rlpost.envs import Message, StepResult, Task, run_tool_calls


class MathToolEnv:
    def __init__(self, sandbox_url: str | list[str] | None = None, python_timeout_s: float = 5.0, python_memory_mb: int = 256):
        from rlpost.tools import CalculatorTool, PythonTool

        self.tools = [CalculatorTool()]
        if sandbox_url:
            from rlpost.sandbox.client import shared_client

            self.tools.append(PythonTool(shared_client(sandbox_url), python_timeout_s, python_memory_mb))
        self.task: Task | None = None

    def reset(self, task: Task) -> list[Message]:
        self.task = task
        return list(task.messages) or [{"role": "user", "content": task.question}]

    def step(self, action: str) -> StepResult:
        from rlpost.rewards.math import math_reward

        tool_messages = run_tool_calls(action, self.tools)
        if tool_messages is not None:
            return StepResult(tool_messages, {"accuracy": 0.0}, False, {"tool_calls": len(tool_messages)})
        t = self.task
        return StepResult([], math_reward(t.question, action, t.answer, t.metadata), True)
