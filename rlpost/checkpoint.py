"""Checkpoint layout and atomic publication.

    output_dir/checkpoints/
        step_000010/
            policy/            written by the training engine (world-size independent),
                               plus rng_rank<r>.pt: each trainer rank's generators
            critic/            PPO's value model, laid out like policy/
            rollout_buffer.pkl trainer.mode=one_step_off|async: batches sampled ahead
            controller.json    step, policy version, data position, KL controller
            rng.pt             the controller process's generators (rlpost.utils.rng)
        latest                 name of the newest complete checkpoint, written last

A checkpoint is built under a temporary name and renamed into place when complete;
``latest`` is replaced atomically afterwards. A crash at any point therefore leaves
either the previous or the new checkpoint as ``latest``, never a partial one. Every
file is fsynced before the rename and each rename is fsynced in its folder, so this
also holds when the machine itself goes down (not only the process): without it a
rename can reach the disk before the data it names.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rlpost.errors import ConfigError

RNG_FILE = "rng.pt"


@dataclass(frozen=True)
class ControllerState:
    step: int  # training steps completed
    policy_version: int
    data: dict  # PromptStream.state_dict()
    kl_controller: dict  # KL coefficient controller state (adaptive KL in the reward)
    # trainer.mode=one_step_off|async: producer position and buffered batches
    # (rlpost.rollout.overlap.OverlappedRun.save); {} for sync runs and older checkpoints.
    overlap: dict = field(default_factory=dict)
    # Run guards that span steps: consecutive skipped updates (policy, critic) and
    # whether the length-cap warning was given; {} in older checkpoints.
    guards: dict = field(default_factory=dict)


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last = Path(root), keep_last

    def begin(self, step: int) -> Path:
        """A fresh temporary folder to write step ``step`` into."""
        tmp = self.root / f".tmp-step_{step:06d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, state: ControllerState) -> Path:
        (tmp / "controller.json").write_text(json.dumps(state.__dict__, indent=2))
        fsync_tree(tmp)
        final = self.root / f"step_{state.step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        marker = self.root / "latest.tmp"
        marker.write_text(final.name)
        fsync_path(marker)
        os.replace(marker, self.root / "latest")
        fsync_path(self.root)  # both renames above are entries of this folder
        self._prune()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        if not marker.exists():
            return None
        path = self.root / marker.read_text().strip()
        return path if path.is_dir() else None


def fsync_path(path: Path) -> None:
    """Flush one file's data, or one folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (written by engines and actors that
    know nothing of durability), folders after their contents."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def resolve_resume(resume: str, manager: CheckpointManager) -> Path | None:
    """``auto``: the latest checkpoint if any; ``never``: none; else a path that must exist."""
    if resume == "never":
        return None
    if resume == "auto":
        return manager.latest()
    path = Path(resume)
    if not (path / "controller.json").is_file():
        raise ConfigError(f"resume={resume}: not a checkpoint folder (no controller.json in it)")
    return path


def read_state(path: Path) -> ControllerState:
    return ControllerState(**json.loads((path / "controller.json").read_text()))
