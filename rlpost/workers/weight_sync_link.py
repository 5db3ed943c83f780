"""Driver-side handle of the weight-sync group: trainer rank 0 -> every rollout
replica over a dedicated collective (see ``rlpost.sync.transport`` for the wire
contract).

``push(version)`` is the only thing the controller calls. It returns when every
replica has loaded the weights and serves ``version``; it raises ``WorkerError`` if
that does not happen within ``weight_sync.timeout_s`` instead of hanging.

Failures. The group spans every replica, so one dead replica breaks it. When a push
fails, the link waits for the other ranks' calls to settle and asks who died: a dead
trainer rank raises ``TrainerLost`` (the supervisor rebuilds the trainer and a new
link); dead replicas are replaced by the rollout group, which calls ``resync``: a
new group on a fresh port, then the trainer's current weights (``self.version``)
pushed to every replica, so a replacement never serves stale weights. A second
failure inside ``resync`` is not retried: it raises.

Threads (``trainer.mode=one_step_off|async``). The producer thread can meet a dead
replica in ``generate`` and resync from there while the trainer thread pushes. Push and
resync run under the rollout group's membership lock (``RolloutGroup.lock``, the one
``replace`` holds), so they never interleave and a death is replaced once; the trainer
group orders its ranks' calls itself (``TrainerGroup``), so a resync's send between two
training calls reaches every rank in the same order. What a resync from the producer
sends: the trainer's weights as they are at that moment, labelled ``self.version`` (the
last version pushed). The trainer thread may have updated since (it trains while the
producer samples), so until the next push (at most one step away) the replicas can
serve weights up to one update newer than their label: the label over-states the
samples' age, the staleness bound stays safe, and the off-policy corrections use the
sampler's recorded log-probs, not the label.
"""

from __future__ import annotations

import ray

from rlpost.errors import TrainerLost, WorkerError
from rlpost.workers.cluster import dead_owners
from rlpost.workers.rollout_group import RolloutGroup
from rlpost.workers.trainer_group import TrainerGroup


class _ReplicasDied(Exception):
    def __init__(self, replicas: list[int], cause: Exception):
        super().__init__(f"rollout replicas {replicas} died ({cause.__class__.__name__})")
        self.replicas = replicas


class WeightSyncLink:
    def __init__(self, trainer: TrainerGroup, rollout: RolloutGroup, timeout_s: float):
        self.trainer, self.rollout, self.timeout_s = trainer, rollout, timeout_s
        # Version of the trainer's weights last pushed (None: the replicas still hold
        # the weights they loaded at start, which are the trainer's initial ones).
        self.version: int | None = None
        rollout.set_resync(self.resync)
        self._connect()

    def _gather(self, trainer_refs: list, rollout_refs: list, what: str) -> list:
        """Wait for both sides; classify a failure as a dead trainer rank
        (``TrainerLost``), dead replicas (``_ReplicasDied``) or neither (re-raised)."""
        refs = trainer_refs + rollout_refs
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WorkerError(f"{what} did not finish within weight_sync.timeout_s={self.timeout_s:.0f}s") from None
        except ray.exceptions.RayError as err:
            dead = dead_owners(refs, self.timeout_s)
            if any(i < len(trainer_refs) for i in dead):
                raise TrainerLost(f"{what}: a trainer rank died") from err
            replicas = [i - len(trainer_refs) for i in dead]
            if replicas:
                raise _ReplicasDied(replicas, err) from err
            raise WorkerError(f"{what} failed: {err}") from err

    def _connect(self) -> None:
        world = 1 + self.rollout.size
        host, port = self.trainer.weight_sync_init(world)
        try:
            self._gather([self.trainer.weight_sync_connect()], self.rollout.weight_sync_connect(host, port, world),
                         "weight sync connect")
        except _ReplicasDied as err:
            # Replacing them calls resync(), which connects again (bounded by rollout.max_restarts).
            self.rollout.replace(err.replicas, f"weight sync connect: {err}")

    def _push_once(self, version: int) -> None:
        plan = self.trainer.weight_plan()
        sends = self.trainer.send_weights(version)
        receives = self.rollout.receive_weights(plan, version)
        served = self._gather(sends, receives, f"weight sync of version {version}")[len(sends):]
        stale = [i for i, v in enumerate(served) if v != version]
        if stale:
            raise WorkerError(f"weight sync of version {version}: replicas {stale} serve versions "
                              f"{[served[i] for i in stale]} after loading; their engine did not take the weights")

    def push(self, version: int) -> None:
        with self.rollout.lock:
            self.version = version  # the trainer's weights are this version from now on
            _, seen = self.rollout.members()
            try:
                with self.trainer.exclusive():
                    self._push_once(version)
            except _ReplicasDied as err:
                # Replacing them calls resync(), which rebuilds the group and pushes again.
                self.rollout.replace(err.replicas, f"weight sync of version {version}: {err}", seen=seen)

    def resync(self) -> None:
        """Rebuild the group over the current replicas and bring all of them to the
        trainer's current weights. Called by the rollout group after replacements
        (under its lock, which this takes again, for a caller outside ``replace``)."""
        with self.rollout.lock:
            with self.trainer.exclusive():
                self._connect()
            if self.version is not None:
                try:
                    with self.trainer.exclusive():
                        self._push_once(self.version)
                except _ReplicasDied as err:
                    raise WorkerError(f"weight sync resync of version {self.version}: {err} again") from err
