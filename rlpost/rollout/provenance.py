"""Per-token provenance: which policy versions sampled a batch, and how far behind
the trainer's weights they were (in-flight weight updates, ``trainer.inflight_updates``).

Lag of a token = the version the update starts from - the version that sampled it.
Shares are over sampled tokens (``loss_mask`` 1; tokens an environment inserted are
not counted), so they say how much of what the policy loss sees was how stale.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlpost.types import Trajectory


def oldest_version(trajectories: Sequence[Trajectory]) -> int:
    """The oldest policy version of any token in the batch (what staleness bounds check)."""
    return min(t.completion.policy_version for t in trajectories)


def token_lag_metrics(trajectories: Sequence[Trajectory], version: int) -> dict[str, float]:
    """``async/version_oldest``/``newest`` of the batch's sampled tokens and the share
    of them that lag ``version`` by 0, 1 and 2 or more versions."""
    counts = [0, 0, 0]
    sampled: list[int] = []  # versions of the sampled tokens
    for t in trajectories:
        c = t.completion
        mask = c.loss_mask if c.loss_mask is not None else (1,) * len(c.token_ids)
        sampled += [v for v, m in zip(c.versions(), mask) if m]
    for v in sampled:
        counts[min(max(version - v, 0), 2)] += 1
    total = max(len(sampled), 1)
    # No sampled token at all: the samples' versions stand in.
    oldest = min(sampled) if sampled else oldest_version(trajectories)
    newest = max(sampled) if sampled else oldest
    return {"async/version_oldest": float(oldest), "async/version_newest": float(newest),
            "async/token_lag_0": counts[0] / total, "async/token_lag_1": counts[1] / total,
            "async/token_lag_2plus": counts[2] / total}
