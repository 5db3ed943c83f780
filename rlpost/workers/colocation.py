"""Ray side of colocated placement (``rollout.colocate=true``, GPU only; the contract is
in ``rlpost.engines.colocate``).

- ``ColocatedPlacement``: one placement-group bundle per GPU; trainer rank i and rollout
  replica i both go into bundle i with half a GPU each (Ray's fractional GPUs only
  decide placement; memory is shared through vLLM's sleep mode).
- ``ReplicaClient``: vLLM's ``VLLMWeightSyncClient`` protocol over the rollout actors.
  It travels to trainer rank 0 inside ``ColocatedWeightSync.push`` and fans every
  control-plane call out to all replicas, blocking until each answers.
- ``ColocatedWeightSync``: the driver's ``push(version)``, the same contract as
  ``WeightSyncLink.push``: every replica serves ``version`` when it returns, or
  ``WorkerError`` after ``weight_sync.timeout_s``.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlpost.engines.colocate import MemoryPhases
from rlpost.errors import WorkerError
from rlpost.workers.cluster import wait


class ColocatedPlacement:
    def __init__(self, gpus: int, cpus_per_gpu: int = 2, timeout_s: float = 300.0):
        have = ray.cluster_resources().get("GPU", 0)
        if have < gpus:
            raise WorkerError(f"rollout.colocate=true needs {gpus} GPUs (trainer.world_size) in the Ray "
                              f"cluster, which has {have:g}")
        self.group = placement_group([{"GPU": 1, "CPU": cpus_per_gpu}] * gpus, strategy="PACK")
        wait(self.group.ready(), timeout_s, "colocated placement group")

    def options(self, index: int) -> dict:
        """Actor options putting an actor on GPU ``index`` of the group."""
        return {"num_gpus": 0.5, "num_cpus": 1,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index)}

    def shutdown(self) -> None:
        """Give the GPUs back to the cluster (after the actors in it are gone)."""
        remove_placement_group(self.group)


class ReplicaClient:
    """``VLLMWeightSyncClient`` over rollout actors (picklable: it holds actor handles).
    ``version`` is set by the driver before each push; ``finish_weight_update`` makes
    every replica serve it."""

    def __init__(self, actors: list, timeout_s: float, version: int = 0):
        self.actors, self.timeout_s, self.version = list(actors), timeout_s, version

    def _all(self, method: str, *args) -> None:
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        wait(refs, self.timeout_s, f"colocated weight sync: {method}")

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all("weight_transfer", "init_weight_transfer_engine", init_info)

    def start_weight_update(self) -> None:
        self._all("weight_transfer", "start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._all("weight_transfer", "update_weights", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", self.version)


class ColocatedWeightSync:
    """``push(version)``: wake the replicas' weights, run vLLM's IPC transfer on every
    trainer rank (rank 0 drives the replicas through a ``ReplicaClient``), wake the KV
    caches. ``phases`` is shared with the groups, which move it to ``train`` before
    trainer compute and back to ``rollout`` before generating."""

    def __init__(self, trainer, rollout, timeout_s: float):
        self.trainer, self.rollout, self.timeout_s = trainer, rollout, timeout_s
        self.phases = MemoryPhases(sleep=lambda: self._replicas("sleep"),
                                   wake=lambda tags: self._replicas("wake_up", tags))
        self.version: int | None = None  # last pushed; None: replicas hold the initial weights
        rollout.set_resync(self.resync)

    def _replicas(self, method: str, *args) -> None:
        wait([getattr(a, method).remote(*args) for a in self.rollout.actors], self.timeout_s, f"rollout.{method}")

    def push(self, version: int) -> None:
        self.version = version
        client = ReplicaClient(self.rollout.actors, self.timeout_s, version)
        self.phases.sync(lambda: wait([a.ipc_send_weights.remote(client) for a in self.trainer.actors],
                                      self.timeout_s, f"colocated weight sync of version {version}"))
        served = wait([a.policy_version.remote() for a in self.rollout.actors], 60, "rollout.policy_version")
        stale = [i for i, v in enumerate(served) if v != version]
        if stale:
            raise WorkerError(f"colocated weight sync of version {version}: replicas {stale} serve "
                              f"{[served[i] for i in stale]}")

    def resync(self) -> None:
        """Called by the rollout group after it replaced replicas (during ``generate``,
        so every replica is awake). A replacement holds the initial weights and has no
        IPC receiver: every trainer rank drops its IPC engine, so the push re-creates it
        and initialises every replica's receiver, then the current version is pushed."""
        wait([a.reset_ipc.remote() for a in self.trainer.actors], self.timeout_s, "colocated weight sync reset")
        if self.version is not None:
            self.push(self.version)
