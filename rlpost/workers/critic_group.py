"""Critic group: PPO's value model on ``trainer.world_size`` actors of its own, one
FSDP2 shard each, in a torch.distributed group of their own (gloo on CPU, NCCL on
GPU). Built only for an algorithm that needs a critic (``algorithm.name: ppo``).

Its own actors rather than a second engine inside the trainer ranks: the critic
then never shares a process, a collective or a failure with the policy, and the
trainer group stays as it is. The cost is one more process per rank (one more
copy of the base model's memory, which colocation would have cost too).

Contract of every ``CriticGroup`` method: collective (called on all ranks), blocks
until all ranks answer, raises ``TrainerLost`` if a rank dies. ``forward_values``
and ``train_step`` shard rows over ranks like ``TrainerGroup``. The supervisor
builds and rebuilds it together with the trainer group (``rlpost.step.supervisor``): a
lost critic rank costs the same as a lost policy rank, a rebuild from the latest
checkpoint, which holds both.
"""

from __future__ import annotations

import ray
import torch

from rlpost.config.schema import RunConfig
from rlpost.errors import TrainerLost
from rlpost.types import TrainBatch
from rlpost.workers.cluster import merge_rank_metrics, wait_ranks
from rlpost.workers.placement import GroupPlacement, started_devices
from rlpost.workers.rank import DataParallelRank


@ray.remote
class CriticActor(DataParallelRank):
    """One data-parallel rank of the value model."""

    role = "critic"

    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.engine = None

    def _engine(self):
        return self.engine

    def setup(self, cfg: RunConfig, model_path: str, master: tuple[str, int]) -> None:
        from rlpost.step.critic import critic_trainer_config
        from rlpost.engines import make_train_engine

        self.join_group(cfg, master)  # threads as a trainer rank (rlpost.threads)
        critic_cfg = critic_trainer_config(cfg)  # trainer.backend and its ZeRO stage, the critic's optimizer
        self.engine = make_train_engine(critic_cfg.backend, model_path, cfg.model, critic_cfg, trainable=True,
                                        seed=cfg.seed, head="value")

    def forward_values(self, shard: TrainBatch, micro_batch_size: int) -> torch.Tensor:
        return self.engine.forward_values(shard, micro_batch_size=micro_batch_size).values

    def train_step(self, shard: TrainBatch, loss_fn, micro_batch_size: int) -> dict[str, float]:
        return self.engine.train_step(shard, loss_fn, micro_batch_size)


class CriticGroup:
    def __init__(self, cfg: RunConfig, model_path: str):
        self.cfg = cfg
        self.world_size = cfg.trainer.world_size
        self._placement = GroupPlacement.create("critic", self.world_size, cfg.critic.gpus_per_rank,
                                                cfg.critic.resources, cfg.trainer.placement_strategy,
                                                cfg.ray.placement_timeout_s)
        self.actors = [CriticActor.options(**self._placement.options(rank)).remote(rank, self.world_size)
                       for rank in range(self.world_size)]
        try:
            self.devices = started_devices(self.actors, "critic")
            master = self._wait(self.actors[0].rendezvous.remote(), "critic rendezvous", 120)
            self._wait([a.setup.remote(cfg, model_path, master) for a in self.actors], "critic setup")
        except BaseException:
            self.kill()
            raise

    def _wait(self, refs, what: str, timeout_s: float | None = None):
        return wait_ranks(refs, what, timeout_s, lost=TrainerLost)

    def pids(self) -> list[int]:
        return self._wait([a.pid.remote() for a in self.actors], "critic pid", 60)

    def _sharded(self, method: str, batch: TrainBatch, *args) -> list:
        shards = batch.shard(self.world_size)
        return self._wait([getattr(a, method).remote(s, *args) for a, s in zip(self.actors, shards)],
                          f"critic.{method}")

    def forward_values(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] values (``rlpost.types`` alignment); rows sharded, gathered in order."""
        return torch.cat(self._sharded("forward_values", batch, self.cfg.trainer.micro_batch_size), dim=0)

    def train_step(self, batch: TrainBatch, loss_fn) -> dict[str, float]:
        """One critic optimizer step over ``batch`` sharded across ranks; metrics merged
        as ``TrainerGroup.train_step`` does (additive ones summed, global ones once)."""
        return merge_rank_metrics(self._sharded("train_step", batch, loss_fn, self.cfg.trainer.micro_batch_size))

    def save(self, path: str) -> None:
        self._wait([a.save.remote(path) for a in self.actors], "critic save")

    def load(self, path: str) -> None:
        self._wait([a.load.remote(path) for a in self.actors], "critic load")

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        except Exception:  # already dead: nothing left to release
            pass
        self.kill()

    def kill(self) -> None:
        """Tear down without asking (peers of a dead rank block in collectives)."""
        for actor in self.actors:
            ray.kill(actor)
        if self._placement is not None:
            self._placement.shutdown()
            self._placement = None
