"""Runs user agents (``env.agent``) against gateway sessions, many at a time, each
under a deadline.

An agent is ``async def agent(client, row, **env.kwargs)``: ``client`` is an
``openai.AsyncOpenAI`` already pointed at the episode's gateway session
(``http://127.0.0.1:PORT/sessions/<id>/v1``), ``row`` the task as a plain dict
(``uid``, ``question``, ``answer``, ``metadata``, ``messages``: the dataset's opening
conversation). It returns the episode's reward (a float or a dict of components) or
None to have ``reward.fn`` score its final answer. What it sent and got back is
recorded by the gateway, not here.

``AgentRunner`` is the piece both pools share: ``LocalAgentPool`` (below, in process)
and the Ray ``AgentActor`` (``rlpost.workers.agent_pool``). An agent that raises,
returns something else, or passes ``timeout_s`` becomes an ``EnvFailure`` for its
episode alone; the caller (``rlpost.rollout.agents``) retries or drops it.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from rlpost.envs.base import EnvFailure
from rlpost.envs.runner import resolve_env_spec
from rlpost.errors import ConfigError

# Sent as the bearer token; the gateway on loopback does not check it (see GatewayConfig).
_LOOPBACK_KEY = "rlpost-loopback"


@dataclass(frozen=True)
class AgentResult:
    """What a finished agent returned: its reward, or None for ``reward.fn`` to score."""

    reward: float | dict[str, float] | None


def resolve_agent_spec(spec: str) -> str:
    """``"path/file.py:fn"`` made absolute (Ray workers start elsewhere); module specs as is."""
    try:
        return resolve_env_spec(spec)
    except ConfigError:
        raise ConfigError(f"env.agent: {spec!r} must look like 'package.module:fn' or 'path/to/file.py:fn'") from None


def load_agent_fn(spec: str) -> Callable[..., Any]:
    """The agent function named by ``spec``; ConfigError naming what could not be
    imported, or why the object found is not an async function."""
    from rlpost.errors import RewardError
    from rlpost.rewards.api import load_reward_fn  # the same importer: module or file path

    try:
        fn = load_reward_fn(spec)
    except RewardError as exc:  # the shared importer speaks of reward functions
        raise ConfigError(f"env.agent: could not load {spec!r}: "
                          f"{str(exc).replace('reward function', 'agent')}") from exc
    if not inspect.iscoroutinefunction(fn):
        raise ConfigError(f"env.agent: {spec!r} is {type(fn).__name__} {fn!r:.80}, not an async function; "
                          "write it as `async def agent(client, row): ...` (it awaits the openai.AsyncOpenAI client)")
    return fn


def task_row(uid: str, question: str, answer: str, metadata: dict, messages: list[dict]) -> dict[str, Any]:
    """The ``row`` an agent gets: plain data, so it pickles to an actor and needs no rlpost type."""
    return {"uid": uid, "question": question, "answer": answer, "metadata": dict(metadata),
            "messages": [dict(m) for m in messages]}


def check_agent_reward(value: Any) -> float | dict[str, float] | None:
    """The agent's return value if it is a finite float, a dict of finite floats, or
    None; TypeError otherwise (an episode failure, like an exception)."""
    if value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool)
                         and math.isfinite(float(value))):
        return None if value is None else float(value)
    if isinstance(value, Mapping) and value and all(
            isinstance(k, str) and isinstance(v, numbers.Real) and math.isfinite(float(v)) for k, v in value.items()):
        return {k: float(v) for k, v in value.items()}
    raise TypeError(f"the agent returned {value!r:.80}; return a finite float, a dict of finite floats, "
                    "or None (reward.fn scores the final answer)")


class AgentRunner:
    """Runs agents of a batch of episodes concurrently on the caller's event loop."""

    def __init__(self, spec: str, kwargs: dict | None, timeout_s: float):
        self.fn = load_agent_fn(spec)
        self.kwargs = dict(kwargs or {})
        self.timeout_s = timeout_s

    async def run(self, items: list[tuple[str, str, dict]]) -> list[AgentResult | EnvFailure]:
        """``items``: (episode id, session base URL, row); one result per item, in order."""
        return list(await asyncio.gather(*(self._run_one(url, row) for _, url, row in items)))

    async def _run_one(self, base_url: str, row: dict) -> AgentResult | EnvFailure:
        import openai

        # No client retries: a failed request is the episode's failure (retried whole,
        # on a fresh session, by the caller), never a silent resend into the same session.
        client = openai.AsyncOpenAI(base_url=base_url, api_key=_LOOPBACK_KEY, max_retries=0,
                                    timeout=self.timeout_s)
        try:
            value = await asyncio.wait_for(self.fn(client, row, **self.kwargs), self.timeout_s)
            return AgentResult(check_agent_reward(value))
        except (asyncio.TimeoutError, TimeoutError):
            return EnvFailure(f"agent timed out after {self.timeout_s:g} s (env.timeout_s)")
        except Exception as exc:
            return EnvFailure(f"agent raised {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            await client.close()


class LocalAgentPool:
    """``AgentPool``'s method, in this process (tests, notebooks): one ``AgentRunner``
    on one private event loop. The gateway must serve from another thread (it does:
    ``GatewayServer`` runs uvicorn in its own)."""

    def __init__(self, spec: str, kwargs: dict | None = None, timeout_s: float = 30.0):
        self.runner = AgentRunner(resolve_agent_spec(spec), kwargs, timeout_s)
        self.loop = asyncio.new_event_loop()

    def run(self, items: list[tuple[str, str, dict]]) -> list[AgentResult | EnvFailure]:
        return self.loop.run_until_complete(self.runner.run(items))

    def shutdown(self) -> None:
        self.loop.close()
