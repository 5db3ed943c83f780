"""Rollout and training at the same time: ``trainer.mode=one_step_off|async``.

Two threads on the driver. The groups block their caller (Ray ``wait``), so
overlap needs a second caller; the replicas and the trainer ranks are separate
processes (or, with ``rlpost.local``, torch code that releases the GIL).

    producer thread ("rlpost-rollout-producer")   trainer thread (the caller of run)
    buffer.reserve()   waits for a free slot       buffer.get()      waits for a batch
    with replicas lock:                             drop it if older than max_staleness
        Collector.collect(batch k, version v)       Controller.train_on(step)
        buffer.put(batch)                             -> weight sync, under the replicas lock
                                                       (in-flight updates: without it)
                                                    eval, checkpoint: under the replicas lock

Policy versions. The trainer's weights after ``s`` updates are version ``s`` (as in
sync mode); a batch is sampled by the version the replicas serve when its
``collect`` starts, and every ``Completion`` records it. The replicas lock is held
for a whole ``collect`` and for every weight push, so weights change only between
requests: a batch is never sampled by two versions.

In-flight updates (``trainer.inflight_updates``, async only). The push does not take
the replicas lock: the replicas load the new weights between two decoding steps of
the requests in flight (``rlpost.engines.inflight``), which go on with them (partial
rollouts; ``rollout.inflight_kv`` says what happens to their KV cache). The producer
never waits for the trainer, and the trainer never waits for a batch to finish
before pushing. Every token records the version that sampled it
(``Completion.token_versions``); a completion's ``policy_version``, and a batch's,
is its OLDEST token's: the version served when its ``collect`` started.

Staleness. A batch whose oldest token was sampled by version ``v``, trained by the
update from version ``w``, is ``w - v`` versions stale; the trainer drops it when
that exceeds the bound (per batch, not per sample, so GRPO groups stay whole).
``async/token_lag_0|1|2plus`` give the share of its sampled tokens per lag and
``async/version_oldest|newest`` the spread (``rlpost.rollout.provenance``). The trainer recomputes the old log-probs with
its current weights, so PPO's ratio is against them; the sampler's log-probs reach
the loss as ``rollout_logprobs`` for ``algorithm.tis_cap`` (truncated importance
sampling, the off-policy correction).

- ``async``: ``trainer.async_buffer`` slots (0: ``max_staleness``). A slot is taken
  before sampling starts and freed when the trainer takes the batch, so a batch
  waits behind at most ``slots - 1`` others plus the update in flight: its staleness
  is at most ``slots``, and with ``slots <= max_staleness`` nothing is ever dropped.
  Which version samples which batch depends on timing, so runs are not repeatable.
- ``one_step_off``: one slot, and the push of version ``s`` first waits for batch
  ``s + 1`` to be sampled. So batch ``k`` is sampled by version ``max(k - 2, 0)``
  while step ``k - 1`` trains: step 1 trains on version 0 (staleness 0), every later
  step on samples one version old. This is fixed, not timing-dependent, so a
  one_step_off run is repeatable and resumes exactly.

Checkpoints hold the buffered batches (``rollout_buffer.pkl``) and the producer's
position: they are saved under the replicas lock, so no batch is half-sampled and
the prompt stream's position matches the buffer. With in-flight updates too: the
save (and eval) waits for the batch in flight to finish and be put in the buffer,
so the checkpoint holds it, token versions included, and a resumed run trains it
first; the producer resumes sampling after the save. Seeds derive from the batch index
(``Collector.sampling_params``), which equals the step unless batches were dropped.

Shutdown: the trainer thread leaves ``run`` on success, ``Preempted``, or any error;
it then closes the buffer (which wakes the producer) and joins the producer. An
error in the producer closes the buffer with it; the trainer's next ``get`` (or
one_step_off's wait) re-raises that exception object, with its traceback.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections import deque
from contextlib import nullcontext
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from rlpost.rollout.collect import Collected, Collector
from rlpost.rollout.provenance import oldest_version, token_lag_metrics
from rlpost.config.schema import TrainerConfig
from rlpost.step.timing import Timer

BUFFER_FILE = "rollout_buffer.pkl"
JOIN_TIMEOUT_S = 120.0  # a producer still sampling after this is left behind (daemon thread)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampledBatch:
    index: int  # 1-based position in the producer's sequence; its sampling seeds derive from it
    policy_version: int  # the oldest version that sampled any token of the batch
    collected: Collected
    timings: dict[str, float]  # the producer's timing/rollout_s, timing/reward_s


class BufferClosed(Exception):
    """The buffer was closed with no error (the trainer is done)."""


class RolloutBuffer:
    """Bounded FIFO of sampled batches, producer thread -> trainer thread.

    Consumes: ``put`` (producer), ``get`` (trainer). ``capacity`` counts batches queued
    and batches being sampled: the producer ``reserve``s a slot before it samples, so
    it never samples a batch that would then wait for room (and grow staler).
    ``budget`` is how many more batches the trainer will take; a dropped batch is
    ``refund``ed, so the producer never samples batches nobody trains on.
    Waits: ``reserve`` until a slot is free and the budget allows; ``get`` until a
    batch is queued; ``wait_sampled(n)`` until ``n`` batches were sampled in all.
    Unblocks: ``get`` frees a slot; ``put`` wakes ``get`` and ``wait_sampled``;
    ``close(error)`` wakes everyone (``reserve`` returns False; ``get`` and
    ``wait_sampled`` raise ``error``, or ``BufferClosed``).
    """

    def __init__(self, capacity: int, budget: int, sampled: int, restored: Sequence[SampledBatch] = ()):
        self.capacity, self.budget, self.sampled = capacity, budget, sampled
        self._items: deque[SampledBatch] = deque(restored)  # may exceed capacity (config changed)
        self._reserved = 0
        self._closed, self._error = False, cast(BaseException | None, None)
        self._cond = threading.Condition()

    def reserve(self) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (
                self.budget > 0 and len(self._items) + self._reserved < self.capacity))
            if self._closed:
                return False
            self._reserved += 1
            self.budget -= 1
            return True

    def put(self, batch: SampledBatch) -> None:
        with self._cond:
            self._reserved -= 1
            self._items.append(batch)
            self.sampled = batch.index
            self._cond.notify_all()

    def get(self) -> tuple[SampledBatch, int]:
        """The oldest batch and how many were ready when asked (0: the trainer waited)."""
        with self._cond:
            ready = len(self._items)
            self._cond.wait_for(lambda: self._items or self._closed)
            if not self._items:
                self._raise()
            batch = self._items.popleft()
            self._cond.notify_all()
            return batch, ready

    def refund(self) -> None:
        with self._cond:
            self.budget += 1
            self._cond.notify_all()

    def wait_sampled(self, count: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.sampled >= count or self._closed)
            if self.sampled < count:
                self._raise()

    def close(self, error: BaseException | None = None) -> None:
        with self._cond:
            if not self._closed:
                self._closed, self._error = True, error
            self._cond.notify_all()

    def snapshot(self) -> list[SampledBatch]:
        with self._cond:
            return list(self._items)

    def _raise(self):
        if self._error is not None:
            raise self._error
        raise BufferClosed("the rollout buffer was closed")


class StepOwner(Protocol):
    """What the overlapped loops need from the loop that owns them (the ``Controller``):
    the policy version the trainer holds, stages 4-7 of a step, and the step's tail."""

    policy_version: int

    def train_on(self, step: int, collected: Collected, timer: Timer, t0: float) -> dict: ...

    def finish_step(self, step: int, metrics: dict, stop_requested, replicas_lock=None) -> None: ...


class _PushBetweenRequests:
    """A weight-sync link wrapped so that a push takes the replicas lock: weights
    change only between ``collect`` calls, never under one. With in-flight updates
    (``trainer.inflight_updates``) the push goes straight to the replicas instead,
    which load it between two decoding steps of the requests in flight."""

    def __init__(self, link, run: OverlappedRun):
        self.link, self.run = link, run

    def push(self, version: int) -> None:
        run, t0 = self.run, time.perf_counter()
        # one_step_off: batch version + 1 must be sampled by the weights before this push.
        # Outside run() (a restore) there is no producer to wait for.
        if run.one_step_off and run.buffer is not None:
            run.buffer.wait_sampled(min(version + 1, run.total_steps))
        with nullcontext() if run.inflight else run.replicas_lock:
            run.sync_wait_s += time.perf_counter() - t0
            self.link.push(version)
            # Every replica serves `version` now; a collect starting later checks its
            # tokens against it (one starting earlier checks against the older one).
            run.serving = version


class OverlappedRun:
    """``Controller.run`` for ``trainer.mode=one_step_off|async`` (module docstring)."""

    def __init__(self, trainer: TrainerConfig, owner: StepOwner, collector: Collector):
        self.owner, self.collector, self.mode = owner, collector, trainer.mode
        tc = trainer
        self.one_step_off = tc.mode == "one_step_off"
        self.inflight = tc.inflight_updates  # pushes do not wait for the batch in flight
        self.max_staleness = 1 if self.one_step_off else tc.max_staleness
        self.capacity = 1 if self.one_step_off else (tc.async_buffer or tc.max_staleness)
        self.total_steps = tc.total_steps
        # Held by the producer for a whole collect, and by the trainer thread to push
        # weights (not with in-flight updates), evaluate and checkpoint.
        self.replicas_lock = threading.Lock()
        self.buffer: RolloutBuffer | None = None
        self.serving = 0  # version every replica serves (at least); set after each push
        self.produced = 0  # batches sampled so far (the stream has handed out their prompts)
        self.dropped = 0  # batches dropped as too stale, over the whole run
        self.sync_wait_s = 0.0  # this step's wait for the lock (and one_step_off's next batch)
        self._restored: list[SampledBatch] = []
        self._producer_error: BaseException | None = None

    def push_between_requests(self, link) -> _PushBetweenRequests:
        """``link`` (a weight-sync link) wrapped to push under the replicas lock."""
        return _PushBetweenRequests(link, self)

    # ------------------------------------------------------------- trainer side
    def run(self, start_step: int, stop_requested) -> dict:
        """Steps ``start_step + 1 ..`` with a producer thread sampling ahead (the owner
        has started the tracker and run the step-0 eval)."""
        self.serving = self.owner.policy_version
        buffer = self.buffer = RolloutBuffer(self.capacity, budget=self.total_steps - start_step - len(self._restored),
                                             sampled=self.produced, restored=self._restored)
        self._restored = []
        producer = threading.Thread(target=self._produce, args=(buffer,), name="rlpost-rollout-producer", daemon=True)
        producer.start()
        try:
            return self._train(buffer, start_step, stop_requested)
        finally:
            buffer.close()
            producer.join(JOIN_TIMEOUT_S)
            if producer.is_alive():
                log.warning("the rollout producer is still sampling after %.0fs; leaving it behind", JOIN_TIMEOUT_S)

    def _train(self, buffer: RolloutBuffer, start_step: int, stop_requested) -> dict:
        owner = self.owner
        step, last = start_step, {}
        while step < self.total_steps:
            t0 = time.perf_counter()
            batch, ready = buffer.get()
            wait_s = time.perf_counter() - t0
            if owner.policy_version - batch.policy_version > self.max_staleness:
                self.dropped += 1
                buffer.refund()
                continue
            step += 1
            timer = Timer(batch.timings)
            self.sync_wait_s = 0.0
            staleness = self._staleness_metrics(batch, owner.policy_version)
            metrics = owner.train_on(step, batch.collected, timer, t0)
            # The sync's wait for the lock (the producer finishing a batch) is idle time, not transfer.
            metrics["timing/weight_sync_s"] -= self.sync_wait_s
            metrics["timing/idle_s"] = wait_s + self.sync_wait_s
            metrics.update(staleness)
            metrics.update({"async/buffer_size": float(ready), "async/dropped_batches": float(self.dropped)})
            owner.finish_step(step, metrics, stop_requested, self.replicas_lock)
            last = metrics
        return last

    @staticmethod
    def _staleness_metrics(batch: SampledBatch, version: int) -> dict:
        """Per-sample lag of the oldest token's policy behind the weights this update
        starts from, and the per-token spread (``rlpost.rollout.provenance``)."""
        trajectories = batch.collected.trajectories
        lags = [version - t.completion.policy_version for t in trajectories]
        return {"async/staleness_mean": sum(lags) / len(lags), "async/staleness_max": float(max(lags)),
                **token_lag_metrics(trajectories, version)}

    # ------------------------------------------------------------ producer side
    def _produce(self, buffer: RolloutBuffer) -> None:
        """Consumes prompts (through the collector); waits for a buffer slot, then for
        the replicas lock; puts one batch per loop. Ends when the buffer closes."""
        try:
            while buffer.reserve():
                with self.replicas_lock:
                    index, version, timer = self.produced + 1, self.serving, Timer()
                    collected = self.collector.collect(index, version, timer)
                    # In flight, later versions may have sampled part of it: the batch is as
                    # old as its oldest token (``version`` otherwise).
                    oldest = oldest_version(collected.trajectories)
                    buffer.put(SampledBatch(index, oldest, collected, dict(timer)))
                    self.produced = index
        except BaseException as err:  # surfaced on the trainer thread by get() / wait_sampled()
            err.add_note(f"(raised in the rollout producer thread, trainer.mode={self.mode})")
            buffer.close(err)

    # -------------------------------------------------------------- checkpoints
    def save(self, folder: Path) -> dict:
        """Called by ``Controller.save`` with the replicas lock held (``_train``): writes
        the buffered batches into the checkpoint folder; returns the JSON part."""
        batches = self.buffer.snapshot() if self.buffer is not None else list(self._restored)
        # Trajectories are frozen dataclasses; the file is this run's own output.
        with open(Path(folder) / BUFFER_FILE, "wb") as f:
            pickle.dump(batches, f)
        return {"mode": self.mode, "produced": self.produced, "dropped": self.dropped,
                "buffered": len(batches)}

    def restore(self, folder: Path, state) -> None:
        """Batches sampled ahead in the checkpoint are trained first, in order. A
        checkpoint of a sync run has none, and its step's batches were all sampled."""
        saved = state.overlap
        self.produced = saved.get("produced", state.step)
        self.dropped = saved.get("dropped", 0)
        self._restored = []
        if saved.get("buffered"):
            with open(Path(folder) / BUFFER_FILE, "rb") as f:
                self._restored = pickle.load(f)
