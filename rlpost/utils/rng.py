"""A process's global random number generators, saved into and restored from a
checkpoint file.

rlpost derives the randomness that shapes a run from seeds (sampling seeds from
(seed, step, replica), mini-batch orders from (seed, step), data order from (seed,
epoch)), so resuming does not need these states today. They are saved anyway so
that whatever does draw from a global generator (dropout in a LoRA adapter, code
run in the controller process) continues where it was instead of starting again
from the seed. Covered: the controller process (``rng.pt``) and every trainer
and critic rank (``rng_rank<r>.pt``). Not covered: reward and environment worker
processes, which are replaced freely; a reward function that wants reproducible
randomness should seed it from its sample.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def capture() -> dict:
    """The Python, NumPy, torch CPU and (when present) CUDA generator states, in types
    ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | os.PathLike) -> None:
    torch.save(capture(), path)


def load(path: str | os.PathLike) -> bool:
    """Restore from ``path``; False (nothing changed) when there is no such file: a
    checkpoint from another world size has no file for the new ranks, and older
    checkpoints have none at all."""
    if not os.path.exists(path):
        return False
    restore(torch.load(path, weights_only=True))
    return True
