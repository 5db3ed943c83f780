"""Env pool: Ray actors hosting environments, so thousands of episodes can be in
flight and an environment that crashes or hangs fails only its own episode.

Each ``EnvActor`` is an async actor wrapping an ``rlpost.envs.EnvRunner``: a batch of
episodes is stepped concurrently on its event loop, each call under ``env.timeout_s``.
An episode lives on one actor from reset to close (its environment object is there).

Failure contract (what ``reset``/``step`` return instead of raising):
* an environment raises or passes its deadline -> ``EnvFailure`` for that episode
  (``EnvRunner``);
* an actor dies (a segfault, ``os._exit``, OOM) -> ``EnvFailure`` for every episode it
  held; Ray restarts it (``max_restarts=-1``) for the retries;
* an actor does not answer within ``timeout_s`` + a grace period (an environment
  blocked its event loop) -> its episodes fail and the actor is killed and restarted.
The caller (``rlpost.rollout.multiturn``) retries or drops failed episodes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import ray

from rlpost.config.schema import EnvConfig
from rlpost.envs.base import EnvFailure, StepResult, Task
from rlpost.envs.runner import EnvRunner, Opening, load_env_factory, resolve_env_spec
from rlpost.faults import FaultCounts

GRACE_S = 30.0  # on top of env.timeout_s before an unresponsive actor is restarted
_RESTART_WAIT_S = 60.0  # how long a reset waits for a restarting actor before its episodes fail
_LOST = "lost env actor"


@ray.remote
class EnvActor:
    def __init__(self, spec: str, kwargs: dict, timeout_s: float):
        self.runner = EnvRunner(spec, kwargs, timeout_s)

    async def reset(self, items: list[tuple[str, Task]]) -> list[Opening | EnvFailure]:
        return await self.runner.reset(items)

    async def step(self, items: list[tuple[str, str]]) -> list[StepResult | EnvFailure]:
        return await self.runner.step(items)

    async def close(self, episode_ids: list[str]) -> None:
        self.runner.close(episode_ids)

    async def ping(self) -> bool:
        return True


class EnvPool:
    """Driver-side handle: ``reset`` / ``step`` route each episode to the actor that
    holds it and gather the results in order; ``close`` frees finished episodes."""

    def __init__(self, cfg: EnvConfig, spec: str, kwargs: dict, faults: FaultCounts | None = None):
        spec = resolve_env_spec(spec)
        load_env_factory(spec)  # a missing factory fails here, in the driver, with a clear error
        self.timeout_s = cfg.timeout_s
        self.faults = faults or FaultCounts()
        self.actors = [EnvActor.options(num_cpus=0, max_restarts=-1, max_concurrency=1000).remote(
            spec, kwargs, cfg.timeout_s) for _ in range(cfg.workers)]
        self.home: dict[str, int] = {}  # episode id -> actor index
        self._next = itertools.count()

    def reset(self, items: list[tuple[str, Task]]) -> list[Opening | EnvFailure]:
        for eid, _ in items:
            self.home[eid] = next(self._next) % len(self.actors)
        out = self._route(items, "reset")
        # A reset only creates a fresh environment, so it is safe to repeat: episodes
        # that met an actor while Ray was restarting it wait for it and try once more.
        lost = [i for i, o in enumerate(out) if isinstance(o, EnvFailure) and o.error.startswith(_LOST)]
        if lost:
            for a in {self.home[items[i][0]] for i in lost}:
                self._wait_ready(a)
            for i, res in zip(lost, self._route([items[i] for i in lost], "reset")):
                out[i] = res
        return out

    def _wait_ready(self, a: int) -> None:
        """Until actor ``a`` answers (Ray restarts a dead one; that takes seconds)."""
        deadline = time.monotonic() + _RESTART_WAIT_S
        while time.monotonic() < deadline:
            try:
                ray.get(self.actors[a].ping.remote(), timeout=max(deadline - time.monotonic(), 0.1))
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError):
                time.sleep(0.5)

    def step(self, items: list[tuple[str, str]]) -> list[StepResult | EnvFailure]:
        return self._route(items, "step")

    def close(self, episode_ids: list[str]) -> None:
        by_actor: dict[int, list[str]] = {}
        for eid in episode_ids:
            if eid in self.home:
                by_actor.setdefault(self.home.pop(eid), []).append(eid)
        for a, eids in by_actor.items():
            self.actors[a].close.remote(eids)  # fire and forget: nothing waits on a close

    def _route(self, items: list[tuple], method: str) -> list:
        by_actor: dict[int, list[int]] = {}
        for i, (eid, _) in enumerate(items):
            by_actor.setdefault(self.home.get(eid, 0), []).append(i)
        refs = {a: getattr(self.actors[a], method).remote([items[i] for i in idx]) for a, idx in by_actor.items()}
        deadline = self.timeout_s + GRACE_S
        return gather_by_actor(
            self.actors, by_actor, refs, len(items), deadline, self.faults,
            late=lambda a: f"{method}: env actor {a} did not answer within {deadline:g} s; restarted",
            lost=lambda a, err: f"{_LOST} {a} ({method}): {type(err).__name__}")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def gather_by_actor(actors: list, shares: dict[int, list[int]], refs: dict, count: int, deadline_s: float,
                    faults: FaultCounts, late: Callable[[int], str],
                    lost: Callable[[int, BaseException], str]) -> list:
    """The answers of ``refs`` (actor index -> the ref of one call over the items
    ``shares[a]``), put back in item order (``count`` items). Waits ``deadline_s`` for all
    of them; an actor that has not answered by then is killed (Ray restarts it) and one
    that died is reported: either way its items become ``EnvFailure(late(a))`` /
    ``EnvFailure(lost(a, err))`` and ``env/actor_failures`` is counted, while the other
    actors' answers stand (the env pool and the agent pool share this)."""
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=deadline_s)
    ready_ids = {r.hex() for r in ready}
    out: list = [None] * count
    for a, ref in refs.items():
        idx = shares[a]
        if ref.hex() not in ready_ids:
            faults.add("env/actor_failures")
            ray.kill(actors[a], no_restart=False)
            results = [EnvFailure(late(a))] * len(idx)
        else:
            try:
                results = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                faults.add("env/actor_failures")
                results = [EnvFailure(lost(a, err))] * len(idx)
        for i, res in zip(idx, results):
            out[i] = res
    return out
