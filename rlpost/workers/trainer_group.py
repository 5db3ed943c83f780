"""Trainer group: ``trainer.world_size`` actors forming one torch.distributed group
(gloo on CPU, NCCL on GPU), each holding one FSDP2 shard of the policy and, when a
KL term needs it, of the frozen reference model.

Contract of every ``TrainerGroup`` method: it is collective (called on all ranks),
blocks until all ranks answer, and raises ``TrainerLost`` if a rank dies (the
whole group is then unusable: ``rlpost.step.supervisor`` rebuilds it from the latest
checkpoint).

Threads. Each rank runs its calls one at a time in the order the driver submitted
them, and a collective deadlocks if two ranks run two calls in different orders. In
``trainer.mode=one_step_off|async`` a second driver thread (the rollout producer, when
it replaces a dead replica) calls the group too, so every call takes ``exclusive()``
(a re-entrant lock) around its submission to all ranks and its wait; the weight-sync
link holds it across a whole re-connect and push, so a training call from the other
thread waits instead of landing in between (where it would also eat into the
weight-sync timeouts).
"""

from __future__ import annotations

import socket
import threading
import uuid
from pathlib import Path

import ray
import torch

from rlpost.config.schema import RunConfig
from rlpost.errors import TrainerLost, WorkerError
from rlpost.types import TrainBatch
from rlpost.workers.cluster import free_port, merge_rank_metrics, node_ip, wait_ranks
from rlpost.workers.placement import GroupPlacement, started_devices
from rlpost.workers.rank import DataParallelRank


@ray.remote
class TrainerActor(DataParallelRank):
    """One data-parallel rank. Holds the policy engine and the optional reference."""

    role = "trainer"

    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.policy = self.reference = self.sender = None

    def _engine(self):
        return self.policy

    def setup(self, cfg: RunConfig, model_path: str, master: tuple[str, int], with_reference: bool) -> None:
        from rlpost.engines import make_train_engine

        self.join_group(cfg, master)
        self._bucket_bytes = int(cfg.weight_sync.bucket_mb * 2**20)
        temperature = cfg.rollout.temperature
        self.policy = make_train_engine(cfg.trainer.backend, model_path, cfg.model, cfg.trainer, trainable=True,
                                        seed=cfg.seed, logit_temperature=temperature)
        if with_reference:
            self.reference = make_train_engine(cfg.trainer.backend, model_path, cfg.model, None, trainable=False,
                                               seed=cfg.seed, logit_temperature=temperature)

    def forward_logprobs(self, shard: TrainBatch, reference: bool, micro_batch_size: int) -> torch.Tensor:
        engine = self.reference if reference else self.policy
        return engine.forward_logprobs(shard, micro_batch_size=micro_batch_size).logprobs

    def train_step(self, shard: TrainBatch, loss_fn, micro_batch_size: int, return_logprobs: bool = False):
        return self.policy.train_step(shard, loss_fn, micro_batch_size, return_logprobs=return_logprobs)

    # --- weight sync: rank 0 sends, the others take part in the gathers only ---
    def weight_sync_init(self, world_size: int, timeout_s: float, bucket_mb: int) -> tuple[str, int] | None:
        if self.rank != 0:
            return None
        host = node_ip()
        port = free_port(host)
        self._sender_args = (host, port, world_size, timeout_s, bucket_mb)
        return host, port

    def weight_sync_connect(self) -> None:
        """Rank 0 joins the sync group (blocks until every replica has joined too)."""
        if self.rank == 0:
            from rlpost.sync.transport import WeightSender

            self.sender = WeightSender(*self._sender_args, device=self._device)

    def weight_plan(self):
        return self.sender.plan(self.policy.named_weight_shapes()) if self.rank == 0 else None

    def send_weights(self, plan, version: int) -> None:
        weights = self.policy.named_full_weights()
        if self.rank == 0:
            self.sender.send(weights, plan, version)
        else:
            for _ in weights:  # every rank must take part in each all-gather
                pass

    def ipc_send_weights(self, client) -> None:
        """Colocated GPUs (rollout.colocate): this rank's part of vLLM's CUDA IPC
        transfer; rank 0 drives the replicas through ``client``
        (``rlpost.workers.colocation.ReplicaClient``). Collective over the trainer group."""
        from rlpost.engines.colocate import ipc_sender

        if getattr(self, "_ipc", None) is None:
            self._ipc = ipc_sender(self.policy, self.rank, client, self._bucket_bytes)
        self._ipc.client = client  # carries this push's version
        self._ipc.send_weights()

    def reset_ipc(self) -> None:
        """Forget the IPC engine (replicas were replaced): the next push builds a new one."""
        self._ipc = None

    def probe_run_dir(self, path: str, token: str) -> str:
        """Write ``token`` into the run directory and read it back (rank 0, at start);
        returns this node's name for the driver's message."""
        node = f"{socket.gethostname()} ({node_ip()})"
        probe = Path(path) / f".storage_probe_{token}"
        try:
            probe.write_text(token)
            back = probe.read_text()
        except OSError as err:
            raise WorkerError(f"trainer rank 0 on node {node} cannot write and read the run directory {path}: "
                              f"{err}. {_SHARED_FS}") from None
        if back != token:
            raise WorkerError(f"trainer rank 0 on node {node} wrote {probe} but read back other content. {_SHARED_FS}")
        return node

    def export_hf(self, path: str, tokenizer_path: str) -> None:
        self.policy.export_hf(path, tokenizer_path)

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
        super().shutdown()


_SHARED_FS = ("The run directory (output_dir) must be one filesystem shared by the driver and every trainer "
              "node (NFS, Lustre, a ReadWriteMany volume) at the same path: checkpoints are written by the "
              "trainer ranks and read by the driver. See docs/deployment.md#shared-storage")


class TrainerGroup:
    """Construction creates the ranks and queues their start-up (device check,
    rendezvous, engine load) without waiting, so the driver can start the other
    groups meanwhile; ``wait_ready()`` blocks until every rank has loaded."""

    def __init__(self, cfg: RunConfig, model_path: str, with_reference: bool, placement=None):
        self.cfg = cfg
        self.world_size = cfg.trainer.world_size
        # Colocated GPUs: rank i shares bundle i with rollout replica i (rlpost.workers.colocation);
        # otherwise the ranks get a placement group of their own, removed with them.
        self._own_placement = None
        if placement is None:
            placement = self._own_placement = GroupPlacement.create(
                "trainer", self.world_size, cfg.trainer.gpus_per_rank, cfg.trainer.resources,
                cfg.trainer.placement_strategy, cfg.ray.placement_timeout_s)
        self.actors = [
            TrainerActor.options(name=None, **placement.options(rank)).remote(rank, self.world_size)
            for rank in range(self.world_size)
        ]
        # Called before any trainer compute; colocation points it at "put vLLM to sleep".
        self.before_compute = lambda: None
        self._plan = None
        self.devices = None
        self._lock = threading.RLock()  # see the module docstring, "Threads"
        # Queued at once (an actor runs its calls in order; Ray hands setup the
        # rendezvous answer when it is ready): no driver round trip between the steps.
        self._device_refs = [a.device.remote() for a in self.actors]
        self._master_ref = self.actors[0].rendezvous.remote()
        self._setup_refs = [a.setup.remote(cfg, model_path, self._master_ref, with_reference) for a in self.actors]

    def wait_ready(self) -> None:
        """Block until every rank has started and loaded its engines (no time limit for
        the load; a rank that fails raises ``WorkerError``, a dead one ``TrainerLost``).
        Kills the group on failure. Idempotent."""
        if self.devices is not None:
            return
        try:
            self.devices = started_devices(self.actors, "trainer", self._device_refs)
            self._wait(self._master_ref, "trainer rendezvous", 120)
            self._wait(self._setup_refs, "trainer setup")
        except BaseException:
            self.kill()
            raise

    def _wait(self, refs, what: str, timeout_s: float | None = None):
        return wait_ranks(refs, what, timeout_s, lost=TrainerLost)

    def exclusive(self) -> threading.RLock:
        """The group's call lock, for a caller that must make several calls with no
        other thread's call in between (``with trainer.exclusive(): ...``)."""
        return self._lock

    def pids(self) -> list[int]:
        return self._wait([a.pid.remote() for a in self.actors], "trainer pid", 60)

    def _sharded(self, method: str, batch: TrainBatch, *args) -> list:
        shards = batch.shard(self.world_size)
        with self._lock:
            self.before_compute()
            return self._wait([getattr(a, method).remote(s, *args) for a, s in zip(self.actors, shards)],
                              f"trainer.{method}")

    def forward_logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        """[B, T] log-probs; rows are sharded over ranks and gathered back in order."""
        parts = self._sharded("forward_logprobs", batch, reference, self.cfg.trainer.micro_batch_size)
        return torch.cat(parts, dim=0)

    def train_step(self, batch: TrainBatch, loss_fn, return_logprobs: bool = False):
        """One optimizer step over ``batch`` sharded across ranks. Additive metrics are
        summed over ranks; ``grad_norm``/``lr``/``skipped`` are global and taken once.
        ``return_logprobs``: ``(metrics, [B, T] detached training-forward log-probs)``."""
        per_rank = self._sharded("train_step", batch, loss_fn, self.cfg.trainer.micro_batch_size, return_logprobs)
        if not return_logprobs:
            return merge_rank_metrics(per_rank)
        return merge_rank_metrics([m for m, _ in per_rank]), torch.cat([lp for _, lp in per_rank], dim=0)

    # --- weight sync (see rlpost.sync.transport for the contract) ---
    def weight_sync_init(self, world_size: int) -> tuple[str, int]:
        ws = self.cfg.weight_sync
        with self._lock:
            return self._wait(self.actors[0].weight_sync_init.remote(world_size, ws.timeout_s, ws.bucket_mb),
                              "weight sync init", 60)

    def weight_sync_connect(self):
        with self._lock:
            return self.actors[0].weight_sync_connect.remote()

    def weight_plan(self):
        with self._lock:
            if self._plan is None:
                self._plan = self._wait(self.actors[0].weight_plan.remote(), "weight plan", 120)
            return self._plan

    def send_weights(self, version: int) -> list:
        """Start sending; returns refs the caller waits on together with the receivers
        (inside ``exclusive()``, so that no other call reaches the ranks meanwhile)."""
        with self._lock:
            plan = self.weight_plan()
            return [a.send_weights.remote(plan, version) for a in self.actors]

    def check_run_dir(self, path: Path) -> None:
        """Prove that trainer rank 0 and the driver see the same run directory: rank 0
        writes a random token there and the driver reads it back. ``WorkerError`` if not."""
        token = uuid.uuid4().hex
        try:
            node = ray.get(self.actors[0].probe_run_dir.remote(str(path), token), timeout=120)
        except ray.exceptions.RayTaskError as err:
            raise WorkerError(str(err.cause)) from None
        probe = Path(path) / f".storage_probe_{token}"
        try:
            seen = probe.read_text()
        except FileNotFoundError:
            seen = None
        finally:
            probe.unlink(missing_ok=True)
        if seen != token:
            what = "cannot find it" if seen is None else "reads other content"
            raise WorkerError(f"trainer rank 0 on node {node} wrote {probe}, but the driver on "
                              f"{socket.gethostname()} {what}. {_SHARED_FS}")

    def save(self, path: str) -> None:
        with self._lock:
            self._wait([a.save.remote(path) for a in self.actors], "trainer save")

    def load(self, path: str) -> None:
        with self._lock:
            self._wait([a.load.remote(path) for a in self.actors], "trainer load")

    def export_hf(self, path: str, tokenizer_path: str) -> None:
        with self._lock:
            self._wait([a.export_hf.remote(path, tokenizer_path) for a in self.actors], "export")

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        except Exception:  # already dead: nothing left to release
            pass
        self.kill()

    def kill(self) -> None:
        """Tear the group down without asking it: after a rank died, the others may be
        blocked in a collective that will never complete."""
        for actor in self.actors:
            ray.kill(actor)
        if self._own_placement is not None:
            self._own_placement.shutdown()
            self._own_placement = None
