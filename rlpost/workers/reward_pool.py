"""Reward pool: actors that score completions in parallel, so a slow reward function
never runs on the driver or the trainer. A function that fails on one sample marks
that sample's Reward with an error; it never fails the step."""

from __future__ import annotations

import ray

from rlpost.config.schema import RewardConfig
from rlpost.sharding import split_contiguous
from rlpost.types import Reward
from rlpost.workers.cluster import wait

# (prompt, completion, ground_truth, metadata), the reward function's arguments.
RewardItem = tuple[str, str, str, dict]


@ray.remote
class RewardActor:
    def __init__(self, cfg: RewardConfig):
        from rlpost.rewards import load_reward_fn

        self.cfg = cfg
        self.fn = load_reward_fn(cfg.fn, kwargs=cfg.kwargs)

    def score(self, items: list[RewardItem]) -> list[Reward]:
        from rlpost.rewards import score_batch

        return score_batch(self.fn, items, self.cfg.timeout_s, self.cfg.kwargs)


class RewardPool:
    def __init__(self, cfg: RewardConfig):
        from rlpost.rewards import load_reward_fn

        # Fail at start-up, in the driver, with a clear error: a missing function or a
        # signature that does not take reward.kwargs.
        load_reward_fn(cfg.fn, kwargs=cfg.kwargs)
        self.cfg = cfg
        self.actors = [RewardActor.options(num_cpus=1).remote(cfg) for _ in range(cfg.workers)]

    def score(self, items: list[RewardItem]) -> list[Reward]:
        """One Reward per item, in order; items are split across the actors."""
        parts = split_contiguous(items, len(self.actors))
        refs = [actor.score.remote(part) for actor, part in zip(self.actors, parts)]
        return [r for result in wait(refs, None, "reward scoring") for r in result]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
