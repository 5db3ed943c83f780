"""Rollout group: ``rollout.replicas`` actors, each owning one rollout engine.

``generate`` splits the prompts into contiguous chunks, one per replica, and joins
the answers back in prompt order. Weight updates are broadcast to every replica over
the weight-sync group; each replica records the policy version it serves, and every
completion carries it.

A replica that dies is replaced (up to ``rollout.max_restarts`` times over the run):
the group waits for the surviving replicas' chunks, starts a fresh actor in the
dead one's slot, asks the weight-sync link (``set_resync``) to rebuild the sync
group and push the current policy version to every replica, and only then re-runs
the lost chunks. A chunk keeps its replica index and so its sampling seed, so the
retry samples exactly what the lost call would have: no sample is lost or scored
as a failure.

Threads. In ``trainer.mode=one_step_off|async`` two driver threads use the group: the
producer generates, the trainer thread pushes weights (and evaluates). Both can see
the same death. ``lock`` (re-entrant) guards the membership: ``replace`` and the
weight-sync link's push and resync run under it, and ``replace`` skips a slot whose
actor was replaced since the caller looked (``generations``), so one death is
replaced once, whichever thread sees it first or second. ``generate`` holds the lock
only to read the actors, never while it waits for them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import ray
import torch

from rlpost.config.schema import RunConfig
from rlpost.errors import WorkerError
from rlpost.faults import FaultCounts
from rlpost.sharding import check_replica, replica_sampling_params, split_contiguous
from rlpost.types import Completion, SamplingParams
from rlpost.workers.cluster import quiet_actor_logs, wait
from rlpost.workers.placement import GroupPlacement, actor_device

log = logging.getLogger(__name__)


# receive_weights runs in a thread of its own ("weights" group), so an in-flight update
# (trainer.inflight_updates) reaches the engine while generate runs in the default
# group; the engine's DecodeGate orders the two. Every other call stays serial, as before.
@ray.remote(concurrency_groups={"weights": 1})
class RolloutActor:
    def __init__(self, cfg: RunConfig, model_path: str, replica: int):
        from rlpost.engines import make_rollout_engine

        threads = cfg.rollout.threads or 1  # resolved by rlpost.threads in rlpost.train
        torch.set_num_threads(threads)
        quiet_actor_logs()
        self._device = actor_device(f"rollout replica {replica}")  # raises, naming the node, for a GPU without CUDA
        # The engine applies the count around every generate (vLLM's CPU worker sets its own at start).
        self.engine = make_rollout_engine(cfg, model_path, seed=cfg.seed + 1000 * replica, device=self._device,
                                          num_threads=threads)
        torch.set_num_threads(threads)  # for the weight loads between generates
        self.replica = replica
        self.receiver = None

    def device(self) -> str:
        return str(self._device)

    def pid(self) -> int:
        """The actor's process id (operators and fault-injection tests kill it by pid)."""
        return os.getpid()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return self.engine.generate(prompts, params)

    # --- colocated GPUs only (rollout.colocate; rlpost.engines.colocate) ---
    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine.wake_up(tags)

    def weight_transfer(self, method: str, payload: dict | None = None) -> None:
        self.engine.weight_transfer(method, payload)

    def finish_weight_update(self, version: int) -> None:
        self.engine.finish_weight_update(version)

    def policy_version(self) -> int:
        return self.engine.policy_version

    def weight_sync_connect(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        from rlpost.sync.transport import WeightReceiver

        if self.receiver is not None:  # a rebuilt group: the old one is unusable
            self.receiver.close()
            self.receiver = None
        self.receiver = WeightReceiver(host, port, self.replica + 1, world_size, timeout_s, device=self._device)

    @ray.method(concurrency_group="weights")
    def receive_weights(self, plan, version: int) -> int:
        # One OpenMP thread in this thread: with more, its copies start a second OpenMP
        # team beside generate's, and once the process's OpenMP threads outnumber the
        # cores libgomp stops spin-waiting between parallel regions, which made every
        # later generate of a small model 1.6x slower on 2 cores (a copy needs no team;
        # the thread count is per calling thread, so generate's stays as it is).
        torch.set_num_threads(1)
        self.engine.update_weights(self.receiver.receive(plan, version), version)
        return self.engine.policy_version

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()


class RolloutGroup:
    def __init__(self, cfg: RunConfig, model_path: str, faults: FaultCounts | None = None, placement=None):
        self.cfg, self.model_path, self.placement = cfg, model_path, placement
        # Colocated GPUs come with a placement from the driver; otherwise the replicas
        # get a placement group of their own (a replacement reuses its slot's bundle).
        self._own_placement = None
        if placement is None:
            r = cfg.rollout
            self.placement = self._own_placement = GroupPlacement.create(
                "rollout", r.replicas, r.gpus_per_replica, r.resources, r.placement_strategy,
                cfg.ray.placement_timeout_s)
        # Called before generating; colocation points it at "wake vLLM up".
        self.before_generate = lambda: None
        self.faults = faults if faults is not None else FaultCounts()
        self.actors = [self._start(i) for i in range(cfg.rollout.replicas)]
        # generations[i]: how many times slot i was given a fresh actor (0 = the first).
        self.generations = [0] * len(self.actors)
        self.lock = threading.RLock()  # membership: actors, generations, the weight-sync group over them
        self.restarts = 0
        self._resync: Callable[[], None] | None = None

    def _start(self, replica: int):
        # Colocated GPUs: replica i shares bundle i with trainer rank i (a replacement too).
        return RolloutActor.options(**self.placement.options(replica)).remote(self.cfg, self.model_path, replica)

    @property
    def size(self) -> int:
        return len(self.actors)

    def pids(self) -> list[int]:
        # No time limit: the answer waits for the engine to load (vLLM on a loaded
        # machine can take minutes); an actor that fails to start raises instead.
        return wait([a.pid.remote() for a in self.members()[0]], None, "rollout.pid")

    def members(self) -> tuple[list, list[int]]:
        """A consistent copy of (actors, generations): a caller that later reports a
        death passes the generations it saw to ``replace``."""
        with self.lock:
            return list(self.actors), list(self.generations)

    def set_resync(self, resync: Callable[[], None]) -> None:
        """``resync()`` rebuilds the weight-sync group over the current actors and
        pushes the current weights; called after replicas are replaced. The link
        registers itself here (a rebuilt link replaces the old one)."""
        self._resync = resync

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 replica: int | None = None) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order (split across replicas, or
        all on ``replica`` when given). Chunks lost to a dead replica are re-run on its
        replacement."""
        self.before_generate()
        if replica is None:
            parts = dict(enumerate(split_contiguous(prompts, self.size)))
        else:
            check_replica(replica, self.size)
            parts = {replica: prompts}
        results: dict[int, list] = {}
        todo = list(parts)
        while todo:
            actors, seen = self.members()
            refs = {i: actors[i].generate.remote(parts[i], replica_sampling_params(params, i)) for i in todo}
            lost, last_err = [], None
            # Collect every chunk before recovering, so the survivors are idle when the
            # sync group is rebuilt and each dead replica is known.
            for i, ref in refs.items():
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    lost.append(i)
                    last_err = err
            if lost:
                self.replace(lost, f"rollout replicas {lost} died during generate ({last_err.__class__.__name__})",
                             seen=seen)
                self.faults.add("rollout/requests_retried", len(lost))
            todo = lost
        return [group for i in sorted(results) for group in results[i]]

    def replace(self, replicas: list[int], reason: str, seen: list[int] | None = None) -> None:
        """Start fresh actors in the slots of dead ``replicas``, then resync weights.
        ``seen``: the generations (``members()``) of the actors the caller found dead;
        a slot replaced since then is skipped, and with nothing left to replace nothing
        is resynced (the thread that replaced it resynced, under the same lock).
        Raises ``WorkerError`` once ``rollout.max_restarts`` replacements are used up.

        Any thread may call it: the lock makes the swap and the resync (which the link
        also runs under this lock) one step that no push or other replacement enters."""
        limit = self.cfg.rollout.max_restarts
        with self.lock:
            stale = [i for i in replicas if seen is None or self.generations[i] == seen[i]]
            for i in stale:
                if self.restarts >= limit:
                    raise WorkerError(f"{reason}; the {limit} replacements allowed by rollout.max_restarts are used "
                                      "up. Raise rollout.max_restarts, or find why replicas die (their logs are in "
                                      "Ray's session folder, e.g. /tmp/ray/session_latest/logs); resume=auto "
                                      "continues from the latest checkpoint")
                ray.kill(self.actors[i])  # already dead: releases its resources
                self.actors[i] = self._start(i)
                self.generations[i] += 1
                self.restarts += 1
                self.faults.add("rollout/actor_restarts")
                log.warning("%s: started a replacement for replica %d (%d of at most %d)", reason, i,
                            self.restarts, limit)
            if stale and self._resync is not None:
                self._resync()

    def policy_versions(self) -> list[int]:
        return wait([a.policy_version.remote() for a in self.members()[0]], 60, "rollout.policy_version")

    def weight_sync_connect(self, host: str, port: int, world_size: int) -> list:
        timeout = self.cfg.weight_sync.timeout_s
        return [a.weight_sync_connect.remote(host, port, world_size, timeout) for a in self.members()[0]]

    def receive_weights(self, plan, version: int) -> list:
        return [a.receive_weights.remote(plan, version) for a in self.members()[0]]

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        except Exception:
            pass
        for actor in self.actors:
            ray.kill(actor)
        if self._own_placement is not None:
            self._own_placement.shutdown()
            self._own_placement = None
