"""Hosts the live environments of many episodes and calls them with deadlines.

``EnvRunner`` is the piece both pools share: ``LocalEnvPool`` (below, in process) and
the Ray ``EnvActor`` (``rlpost.workers.env_pool``) each wrap one. Every call takes a
batch of episodes and runs them concurrently on one event loop; each episode's call
gets its own deadline (``timeout_s``), and an exception or a timeout becomes an
``EnvFailure`` for that episode alone. Synchronous environment methods run in worker
threads: a hung one is abandoned (a Python thread cannot be killed) and its episode
fails, while the other episodes carry on.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from rlpost.envs.base import EnvFailure, Message, StepResult, Task, env_tools, tool_schemas
from rlpost.errors import ConfigError


@dataclass(frozen=True)
class Opening:
    """What ``reset`` produced: the opening messages and the tool schemas to render."""

    messages: list[Message]
    tools: list[dict]


def resolve_env_spec(spec: str) -> str:
    """``"path/file.py:factory"`` with the path made absolute (so Ray workers, whose
    working directory differs, load the same file); module specs are returned as is."""
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"env.fn: {spec!r} must look like 'package.module:factory' or 'path/to/file.py:factory'")
    if module.endswith(".py") or "/" in module:
        module = os.path.abspath(module)
    return f"{module}:{attr}"


def load_env_factory(spec: str) -> Callable[..., Any]:
    from rlpost.errors import RewardError
    from rlpost.rewards.api import load_reward_fn  # the same importer: module or file path

    try:
        return load_reward_fn(spec)
    except RewardError as exc:
        raise ConfigError(f"env.fn: {exc}") from exc


async def _call(fn: Callable, *args) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await _in_daemon_thread(fn, *args)
    return await result if inspect.isawaitable(result) else result


def _in_daemon_thread(fn: Callable, *args) -> asyncio.Future:
    """``fn(*args)`` in a fresh daemon thread. Not an executor: interpreter exit joins
    every executor thread (and loop shutdown the default executor's), so one hung
    synchronous step would keep the process from ever exiting."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value, error):
        if not future.done():  # a timed-out call's future is already cancelled
            future.set_exception(error) if error is not None else future.set_result(value)

    def work():
        try:
            value, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting coroutine
            value, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=work, daemon=True, name="rlpost-env").start()
    return future


class EnvRunner:
    """Environments of in-flight episodes, keyed by episode id; one fresh environment
    per episode from ``factory(**kwargs)``."""

    def __init__(self, spec: str, kwargs: dict | None, timeout_s: float):
        self.factory = load_env_factory(spec)
        self.kwargs = dict(kwargs or {})
        self.timeout_s = timeout_s
        self.envs: dict[str, Any] = {}

    async def reset(self, items: list[tuple[str, Task]]) -> list[Opening | EnvFailure]:
        return list(await asyncio.gather(*(self._reset_one(eid, task) for eid, task in items)))

    async def step(self, items: list[tuple[str, str]]) -> list[StepResult | EnvFailure]:
        return list(await asyncio.gather(*(self._step_one(eid, action) for eid, action in items)))

    def close(self, episode_ids: list[str]) -> None:
        for eid in episode_ids:
            env = self.envs.pop(eid, None)
            closer = getattr(env, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception:  # closing is best effort; the episode is over either way
                    pass

    async def _reset_one(self, eid: str, task: Task) -> Opening | EnvFailure:
        try:
            env = self.factory(**self.kwargs)
            self.envs[eid] = env
            messages = await asyncio.wait_for(_call(env.reset, task), self.timeout_s)
            _check_messages(messages, "reset")
            return Opening(list(messages), tool_schemas(env_tools(env)))
        except Exception as exc:  # includes TimeoutError
            self.close([eid])
            return EnvFailure(_describe(exc, "reset", self.timeout_s))

    async def _step_one(self, eid: str, action: str) -> StepResult | EnvFailure:
        env = self.envs.get(eid)
        if env is None:
            return EnvFailure(f"step: no live environment for episode {eid!r}")
        try:
            result = await asyncio.wait_for(_call(env.step, action), self.timeout_s)
            if not isinstance(result, StepResult):
                raise TypeError(f"step returned {type(result).__name__}, expected rlpost.envs.StepResult")
            _check_messages(result.observation, "step")
            return result
        except Exception as exc:
            self.close([eid])
            return EnvFailure(_describe(exc, "step", self.timeout_s))


def _check_messages(messages: Any, where: str) -> None:
    ok = isinstance(messages, (list, tuple)) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise TypeError(f"{where} must return a list of {{'role': str, 'content': str}} messages, got {messages!r:.120}")


def _describe(exc: BaseException, where: str, timeout_s: float) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"{where} timed out after {timeout_s:g} s"
    return f"{where} raised {type(exc).__name__}: {str(exc)[:300]}"


class LocalEnvPool:
    """``EnvPool``'s methods, in this process (tests, notebooks, debugging): one
    ``EnvRunner``, driven by one private event loop."""

    def __init__(self, spec: str, kwargs: dict | None = None, timeout_s: float = 30.0):
        self.runner = EnvRunner(resolve_env_spec(spec), kwargs, timeout_s)
        # One loop for the pool's life: async environments may hold loop-bound state.
        self.loop = asyncio.new_event_loop()

    def reset(self, items: list[tuple[str, Task]]) -> list[Opening | EnvFailure]:
        return self.loop.run_until_complete(self.runner.reset(items))

    def step(self, items: list[tuple[str, str]]) -> list[StepResult | EnvFailure]:
        return self.loop.run_until_complete(self.runner.step(items))

    def close(self, episode_ids: list[str]) -> None:
        self.runner.close(episode_ids)

    def shutdown(self) -> None:
        self.runner.close(list(self.runner.envs))
        self.loop.close()
