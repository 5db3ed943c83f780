"""The environment interface: an async, gym-like protocol for multi-turn episodes.

    obs = await env.reset(task)                      # messages that open the episode
    result = await env.step(action_text)             # StepResult(observation, reward, done, info)

One environment object runs one episode (the pool creates a fresh one per episode
from a factory), so an environment may keep its episode state in ``self``.

Observations are chat messages (``[{"role": "user" | "tool" | "system", "content": ...}]``):
``reset`` returns the whole opening conversation (system prompt, user question), each
``step`` the messages to append after the model's turn (a tool result, the game's
feedback). The rollout loop renders them with the model's chat template and
tokenises them alone (``rlpost.envs.chat``); the environment never sees token ids.

Rewards: ``step`` returns the reward of that step (a float or a dict of named
components, as a reward function would); an episode's reward is the sum over its
steps. ``info["reward_error"]`` marks the episode's reward as failed (excluded from
group statistics, like a reward function that raised). An exception or a timeout
inside ``reset``/``step`` fails the episode (``EnvFailure``); the rollout loop retries
or drops it and never scores it as a wrong answer.

Methods may be ``async def`` (preferred; many episodes share one event loop) or plain
``def`` (run in a worker thread so a slow one does not block the others).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]  # {"role": ..., "content": ...}


@dataclass(frozen=True)
class Task:
    """What an episode is about: one dataset row (``rlpost.types.PromptSample``)."""

    uid: str
    question: str  # the raw user question
    answer: str  # ground truth (may be empty for open-ended environments)
    metadata: dict[str, Any] = field(default_factory=dict)
    # The dataset's opening conversation (data.system_prompt + the user turn); an
    # environment may return it from reset() as is.
    messages: tuple[Message, ...] = ()


@dataclass(frozen=True)
class StepResult:
    observation: list[Message]  # messages to append; empty when done
    reward: float | dict[str, float]
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvFailure:
    """An environment call that raised, timed out, or whose worker died."""

    error: str


@runtime_checkable
class Environment(Protocol):
    # Tools the model may call (``rlpost.tools.Tool``); rendered into the prompt by
    # the chat template. Optional: environments without tools need not define it.
    async def reset(self, task: Task) -> list[Message]: ...

    async def step(self, action: str) -> StepResult: ...


def env_tools(env: Any) -> list:
    """The environment's tools, or [] when it declares none."""
    return list(getattr(env, "tools", None) or [])


def tool_schemas(tools: list) -> list[dict]:
    """OpenAI/Qwen-style function schemas, what chat templates' ``tools=`` expects."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in tools]
