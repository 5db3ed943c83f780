"""Keeps a run going when the trainer group (or PPO's critic group) dies.

A trainer or critic rank that dies leaves its group unusable (its peers block in
collectives), so the groups are not repaired but rebuilt: tear both down, build a
new trainer group, weight-sync link and critic, load the latest checkpoint, push
its weights to the rollout replicas, and continue from that step. Steps after the
checkpoint are run again (their ``metrics.jsonl`` lines are dropped and rewritten),
so the result is what a SIGKILL + ``resume=auto`` would give, without a new
process. Without a checkpoint yet, the rebuild starts again from step 0 and the
initial weights.
At most ``trainer.max_restarts`` rebuilds per process, then ``WorkerError``.

No Ray here: the builders are passed in (``rlpost.train`` gives Ray-backed ones),
and any ``TrainerLost`` they or the controller raise triggers a rebuild.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from rlpost.checkpoint import CheckpointManager, read_state
from rlpost.step.controller import Controller
from rlpost.errors import TrainerLost, WorkerError
from rlpost.faults import FaultCounts
from rlpost.tracking import Tracker


class TrainerParts(NamedTuple):
    """What one build makes and one death discards: the trainer group, its link to
    the rollout replicas, and the critic group (PPO only)."""

    trainer: Any
    weight_sync: Any
    critic: Any = None

    def kill(self) -> None:
        for group in (self.trainer, self.critic):
            if group is not None:
                group.kill()

    def shutdown(self) -> None:
        for group in (self.critic, self.trainer):
            if group is not None:
                group.shutdown()


class TrainerSupervisor:
    def __init__(self, *, build_trainer: Callable[[], TrainerParts],
                 make_controller: Callable[[TrainerParts], Controller], checkpoints: CheckpointManager,
                 tracker: Tracker, max_restarts: int, faults: FaultCounts, no_rebuild_reason: str | None = None):
        """``build_trainer()`` returns ``TrainerParts``, built fresh;
        ``make_controller(parts)`` returns a controller with a fresh prompt stream (a
        restore sets its position). ``no_rebuild_reason``: why this run cannot rebuild
        at all (a lost trainer then stops it, saying so)."""
        self.build_trainer, self.make_controller = build_trainer, make_controller
        self.checkpoints, self.tracker, self.faults = checkpoints, tracker, faults
        self.max_restarts, self.no_rebuild_reason = max_restarts, no_rebuild_reason
        self.parts: TrainerParts | None = None
        self.restarts = 0

    def run(self, resume_from: Path | None, stop_requested: Callable[[], bool],
            finish: Callable[[Any], None]) -> dict:
        """Train to ``trainer.total_steps`` from ``resume_from`` (None: from scratch),
        then call ``finish(trainer_group)`` (export). Returns the last step's metrics."""
        while True:
            try:
                return self._attempt(resume_from, stop_requested, finish)
            except TrainerLost as err:
                self._discard()
                if self.no_rebuild_reason:
                    raise WorkerError(f"{err}; the trainer group is not rebuilt: {self.no_rebuild_reason}; "
                                      "resume=auto continues from the latest checkpoint") from err
                self.restarts += 1
                if self.restarts > self.max_restarts:
                    raise WorkerError(
                        f"the trainer group died again ({err}) after {self.max_restarts} rebuilds "
                        f"(trainer.max_restarts={self.max_restarts}); stopping. Check the trainer logs in "
                        "Ray's session folder; resume=auto continues from the latest checkpoint") from err
                self.faults.add("trainer/restarts")
                resume_from = self.checkpoints.latest()
                self.tracker.message(
                    f"rlpost: warning: trainer group lost ({err}); rebuilding it from "
                    f"{resume_from or 'the initial weights (no checkpoint yet)'} "
                    f"(rebuild {self.restarts} of at most trainer.max_restarts={self.max_restarts})")

    def _attempt(self, resume_from: Path | None, stop_requested, finish) -> dict:
        self.parts = self.build_trainer()
        controller = self.make_controller(self.parts)
        start = 0
        if resume_from is not None:
            state = read_state(resume_from)
            controller.restore(resume_from, state)
            self.tracker.truncate_after(state.step)
            start = state.step
            self.tracker.message(f"rlpost: resumed from {resume_from} at step {start}")
        elif self.restarts:
            # Rebuilt before the first checkpoint: the replicas hold the dead trainer's
            # newer weights; bring them back to the initial ones and log from scratch.
            controller.sync_weights(0)
            self.tracker.truncate_after(-1)
        last = controller.run(start, stop_requested=stop_requested)
        finish(self.parts.trainer)
        return last

    def _discard(self) -> None:
        if self.parts is not None:
            self.parts.kill()
            self.parts = None

    def shutdown(self) -> None:
        if self.parts is not None:
            self.parts.shutdown()
            self.parts = None
