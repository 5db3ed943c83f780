"""How driver-side groups split work over replicas: pure helpers shared by the Ray
groups (``rlpost.workers``) and the in-process ones (``rlpost.local``), so that both
split prompts and derive per-replica seeds identically and a run gives the same
samples with or without a cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

from rlpost.types import SamplingParams

T = TypeVar("T")


def split_contiguous(items: Sequence[T], num_parts: int) -> list[list[T]]:
    """Contiguous chunks of ``ceil(len(items) / num_parts)`` items, in order.

    Concatenating the chunks gives ``items`` back. There are at most ``num_parts``
    chunks and no empty ones: 3 items over 2 parts is ``[[a, b], [c]]``, 1 item over
    4 parts is ``[[a]]``, no items is ``[]``. Callers zip the chunks with their
    replicas, so the trailing replicas of a short list simply get no work.
    """
    if num_parts < 1:
        raise ValueError(f"need num_parts >= 1, got {num_parts}")
    if not items:
        return []
    chunk = -(-len(items) // num_parts)
    return [list(items[i : i + chunk]) for i in range(0, len(items), chunk)]


def replica_sampling_params(params: SamplingParams, replica: int) -> SamplingParams:
    """``params`` for rollout replica ``replica``.

    A pinned seed becomes ``seed * 1009 + replica``: distinct per replica, so two
    replicas never sample identical tokens for the same seed, and still a function
    of (seed, replica) alone, so a step is reproducible (and a resumed run samples
    what the uninterrupted one did). ``seed=None`` is left to each engine's generator.
    """
    return params if params.seed is None else replace(params, seed=params.seed * 1009 + replica)


def check_replica(replica: int, size: int) -> None:
    """Raise ``ValueError`` unless ``replica`` indexes one of ``size`` replicas."""
    if not 0 <= replica < size:
        raise ValueError(f"replica {replica} does not exist: this group has replicas 0..{size - 1}")
