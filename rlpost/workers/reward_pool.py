"""Reward pool: actors that score completions in parallel, so a slow reward function
never runs on the driver or the trainer. A function that fails on one sample marks
that sample's Reward with an error; it never fails the step.

A worker that dies (a reward function that crashes its process, OOM) is replaced,
up to ``reward.max_restarts`` times over the run, and its items are scored again on
the replacement. If the replacement dies on them too, those items get
``Reward(error=...)``: excluded from group statistics like any failed reward, not
scored as zero.
"""

from __future__ import annotations

import logging
import os

import ray

from rlpost.config.schema import RewardConfig
from rlpost.errors import WorkerError
from rlpost.faults import FaultCounts
from rlpost.sharding import split_contiguous
from rlpost.types import Reward

log = logging.getLogger(__name__)

# (prompt, completion, ground_truth, metadata), the reward function's arguments.
RewardItem = tuple[str, str, str, dict]


@ray.remote
class RewardActor:
    def __init__(self, cfg: RewardConfig):
        from rlpost.rewards import load_reward_fn

        self.cfg = cfg
        self.fn = load_reward_fn(cfg.fn, kwargs=cfg.kwargs)

    def pid(self) -> int:
        return os.getpid()

    def score(self, items: list[RewardItem]) -> list[Reward]:
        from rlpost.rewards import score_batch

        return score_batch(self.fn, items, self.cfg.timeout_s, self.cfg.kwargs)


class RewardPool:
    def __init__(self, cfg: RewardConfig, faults: FaultCounts | None = None):
        from rlpost.rewards import load_reward_fn

        # Fail at start-up, in the driver, with a clear error: a missing function or a
        # signature that does not take reward.kwargs.
        load_reward_fn(cfg.fn, kwargs=cfg.kwargs)
        self.cfg = cfg
        self.faults = faults if faults is not None else FaultCounts()
        self.actors = [self._start() for _ in range(cfg.workers)]
        self.restarts = 0

    def _start(self):
        # @ray.remote adds .options/.remote, which Ray's type stubs do not declare.
        return RewardActor.options(num_cpus=1).remote(self.cfg)  # type: ignore[attr-defined]

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors], timeout=120)

    def score(self, items: list[RewardItem]) -> list[Reward]:
        """One Reward per item, in order; items are split across the actors."""
        parts = split_contiguous(items, len(self.actors))
        refs = [actor.score.remote(part) for actor, part in zip(self.actors, parts)]
        scored = []
        for i, (ref, part) in enumerate(zip(refs, parts)):
            try:
                scored += ray.get(ref)
            except ray.exceptions.RayActorError as err:
                self._replace(i, err)
                scored += self._retry(i, part)
        return scored

    def _retry(self, i: int, part: list[RewardItem]) -> list[Reward]:
        try:
            return ray.get(self.actors[i].score.remote(part))
        except ray.exceptions.RayActorError as err:
            self._replace(i, err)
            reason = f"reward worker died twice while scoring this sample's batch ({err.__class__.__name__})"
            return [Reward(total=0.0, error=reason) for _ in part]

    def _replace(self, i: int, err: Exception) -> None:
        limit = self.cfg.max_restarts
        if self.restarts >= limit:
            raise WorkerError(f"reward worker {i} died ({err.__class__.__name__}) and the {limit} replacements "
                              "allowed by reward.max_restarts are used up: the reward function probably crashes "
                              "its process (see the worker logs in Ray's session folder)") from err
        ray.kill(self.actors[i])
        self.actors[i] = self._start()
        self.restarts += 1
        self.faults.add("reward/actor_restarts")
        log.warning("reward worker %d died (%s); replaced (%d of at most %d)", i, err.__class__.__name__,
                    self.restarts, limit)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
