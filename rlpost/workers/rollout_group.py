"""Rollout group: ``rollout.replicas`` actors, each owning one rollout engine.

``generate`` splits the prompts into contiguous chunks, one per replica, and joins
the answers back in prompt order. Weight updates are broadcast to every replica over
the weight-sync group; each replica records the policy version it serves, and every
completion carries it.
"""

from __future__ import annotations

import ray
import torch

from rlpost.config.schema import RunConfig
from rlpost.sharding import replica_sampling_params, split_contiguous
from rlpost.types import Completion, SamplingParams
from rlpost.workers.cluster import quiet_actor_logs, wait


@ray.remote
class RolloutActor:
    def __init__(self, cfg: RunConfig, model_path: str, replica: int):
        from rlpost.engines import make_rollout_engine

        torch.set_num_threads(1)
        quiet_actor_logs()
        self.engine = make_rollout_engine(cfg, model_path, seed=cfg.seed + 1000 * replica)
        self.replica = replica
        self.receiver = None

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return self.engine.generate(prompts, params)

    def policy_version(self) -> int:
        return self.engine.policy_version

    def weight_sync_connect(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        from rlpost.weight_sync import WeightReceiver

        self.receiver = WeightReceiver(host, port, self.replica + 1, world_size, timeout_s)

    def receive_weights(self, plan, version: int) -> int:
        self.engine.update_weights(self.receiver.receive(plan, version), version)
        return self.engine.policy_version

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()


class RolloutGroup:
    def __init__(self, cfg: RunConfig, model_path: str):
        self.cfg = cfg
        self.actors = [
            RolloutActor.options(num_cpus=1, num_gpus=1 if torch.cuda.is_available() else 0).remote(cfg, model_path, i)
            for i in range(cfg.rollout.replicas)
        ]

    @property
    def size(self) -> int:
        return len(self.actors)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order (split across replicas)."""
        parts = split_contiguous(prompts, self.size)
        refs = [
            actor.generate.remote(part, replica_sampling_params(params, i))
            for i, (actor, part) in enumerate(zip(self.actors, parts))
        ]
        return [group for result in wait(refs, None, "rollout.generate") for group in result]

    def policy_versions(self) -> list[int]:
        return wait([a.policy_version.remote() for a in self.actors], 60, "rollout.policy_version")

    def weight_sync_connect(self, host: str, port: int, world_size: int) -> list:
        timeout = self.cfg.weight_sync.timeout_s
        return [a.weight_sync_connect.remote(host, port, world_size, timeout) for a in self.actors]

    def receive_weights(self, plan, version: int) -> list:
        return [a.receive_weights.remote(plan, version) for a in self.actors]

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        except Exception:
            pass
        for actor in self.actors:
            ray.kill(actor)
