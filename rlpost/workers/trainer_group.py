"""Trainer group: ``trainer.world_size`` actors forming one torch.distributed group
(gloo on CPU, NCCL on GPU), each holding one FSDP2 shard of the policy and, when a
KL term needs it, of the frozen reference model.

Contract of every ``TrainerGroup`` method: it is collective (called on all ranks),
blocks until all ranks answer, and raises ``WorkerError`` if a rank dies.
"""

from __future__ import annotations

import os

import ray
import torch

from rlpost.config.schema import RunConfig
from rlpost.types import TrainBatch
from rlpost.workers.cluster import quiet_actor_logs, free_port, wait


def _local_address() -> str:
    # One machine: loopback, so nothing ever leaves the host. Several nodes: the
    # node's routable address.
    return "127.0.0.1" if len(ray.nodes()) <= 1 else ray.util.get_node_ip_address()


@ray.remote
class TrainerActor:
    """One data-parallel rank. Holds the policy engine and the optional reference."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.policy = self.reference = self.sender = None
        torch.set_num_threads(1)
        quiet_actor_logs()

    def rendezvous(self) -> tuple[str, int]:
        """Address and free port for the torch.distributed group (rank 0 only)."""
        host = _local_address()
        return host, free_port(host)

    def setup(self, cfg: RunConfig, model_path: str, master: tuple[str, int], with_reference: bool) -> None:
        from rlpost.distributed import init_default_group
        from rlpost.engines.fsdp import FSDPEngine

        # FSDP/transformers read these; the group itself is built from an explicit store.
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        init_default_group(master[0], master[1], self.rank, self.world_size)
        torch.manual_seed(cfg.seed)
        temperature = cfg.rollout.temperature
        self.policy = FSDPEngine(model_path, cfg.model, cfg.trainer, trainable=True, seed=cfg.seed,
                                 logit_temperature=temperature)
        if with_reference:
            self.reference = FSDPEngine(model_path, cfg.model, None, trainable=False, seed=cfg.seed,
                                        logit_temperature=temperature)

    def forward_logprobs(self, shard: TrainBatch, reference: bool, micro_batch_size: int) -> torch.Tensor:
        engine = self.reference if reference else self.policy
        return engine.forward_logprobs(shard, micro_batch_size=micro_batch_size).logprobs

    def train_step(self, shard: TrainBatch, loss_fn, micro_batch_size: int) -> dict[str, float]:
        return self.policy.train_step(shard, loss_fn, micro_batch_size)

    # --- weight sync: rank 0 sends, the others take part in the gathers only ---
    def weight_sync_init(self, world_size: int, timeout_s: float, bucket_mb: int) -> tuple[str, int] | None:
        if self.rank != 0:
            return None
        host = _local_address()
        port = free_port(host)
        self._sender_args = (host, port, world_size, timeout_s, bucket_mb)
        return host, port

    def weight_sync_connect(self) -> None:
        """Rank 0 joins the sync group (blocks until every replica has joined too)."""
        if self.rank == 0:
            from rlpost.weight_sync import WeightSender

            self.sender = WeightSender(*self._sender_args)

    def weight_plan(self):
        return self.sender.plan(self.policy.named_weight_shapes()) if self.rank == 0 else None

    def send_weights(self, plan, version: int) -> None:
        weights = self.policy.named_full_weights()
        if self.rank == 0:
            self.sender.send(weights, plan, version)
        else:
            for _ in weights:  # every rank must take part in each all-gather
                pass

    def save(self, path: str) -> None:
        self.policy.save(path)

    def load(self, path: str) -> None:
        self.policy.load(path)

    def export_hf(self, path: str, tokenizer_path: str) -> None:
        self.policy.export_hf(path, tokenizer_path)

    def shutdown(self) -> None:
        from rlpost.distributed import destroy_default_group

        if self.sender is not None:
            self.sender.close()
        destroy_default_group()


class TrainerGroup:
    def __init__(self, cfg: RunConfig, model_path: str, with_reference: bool):
        self.cfg = cfg
        self.world_size = cfg.trainer.world_size
        gpus = 1 if torch.cuda.is_available() else 0
        self.actors = [
            TrainerActor.options(num_cpus=1, num_gpus=gpus, name=None).remote(rank, self.world_size)
            for rank in range(self.world_size)
        ]
        master = wait(self.actors[0].rendezvous.remote(), 120, "trainer rendezvous")
        wait([a.setup.remote(cfg, model_path, master, with_reference) for a in self.actors],
             None, "trainer setup")
        self._plan = None

    def _sharded(self, method: str, batch: TrainBatch, *args) -> list:
        shards = batch.shard(self.world_size)
        return wait([getattr(a, method).remote(s, *args) for a, s in zip(self.actors, shards)],
                    None, f"trainer.{method}")

    def forward_logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        """[B, T] log-probs; rows are sharded over ranks and gathered back in order."""
        parts = self._sharded("forward_logprobs", batch, reference, self.cfg.trainer.micro_batch_size)
        return torch.cat(parts, dim=0)

    def train_step(self, batch: TrainBatch, loss_fn) -> dict[str, float]:
        """One optimizer step over ``batch`` sharded across ranks. Additive metrics are
        summed over ranks; ``grad_norm``/``lr``/``skipped`` are global and taken once."""
        per_rank = self._sharded("train_step", batch, loss_fn, self.cfg.trainer.micro_batch_size)
        global_keys = {"grad_norm", "lr", "skipped"}
        merged = {k: v for k, v in per_rank[0].items() if k in global_keys}
        for metrics in per_rank:
            for key, value in metrics.items():
                if key not in global_keys:
                    merged[key] = merged.get(key, 0.0) + value
        return merged

    # --- weight sync (see rlpost.weight_sync for the contract) ---
    def weight_sync_init(self, world_size: int) -> tuple[str, int]:
        ws = self.cfg.weight_sync
        return wait(self.actors[0].weight_sync_init.remote(world_size, ws.timeout_s, ws.bucket_mb),
                    60, "weight sync init")

    def weight_sync_connect(self):
        return self.actors[0].weight_sync_connect.remote()

    def weight_plan(self):
        if self._plan is None:
            self._plan = wait(self.actors[0].weight_plan.remote(), 120, "weight plan")
        return self._plan

    def send_weights(self, version: int) -> list:
        """Start sending; returns refs the caller waits on together with the receivers."""
        plan = self.weight_plan()
        return [a.send_weights.remote(plan, version) for a in self.actors]

    def save(self, path: str) -> None:
        wait([a.save.remote(path) for a in self.actors], None, "trainer save")

    def load(self, path: str) -> None:
        wait([a.load.remote(path) for a in self.actors], None, "trainer load")

    def export_hf(self, path: str, tokenizer_path: str) -> None:
        wait([a.export_hf.remote(path, tokenizer_path) for a in self.actors], None, "export")

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        except Exception:  # already dead: nothing left to release
            pass
        for actor in self.actors:
            ray.kill(actor)
