"""DAPO's data-side helpers (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement
Learning System at Scale"), as pure functions. Clip-higher lives in ``ppo_clip``
(``clip_eps_high``) and the token-level loss in ``token-mean``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def dynamic_sampling_keep(rewards: torch.Tensor, valid: torch.Tensor, *, atol: float = 0.0) -> torch.Tensor:
    """DAPO dynamic sampling: keep only groups whose valid rewards are not all equal.

    A group where every sample scores the same (all right or all wrong) has zero
    group-relative advantage and adds no gradient, only dilutes the batch; DAPO drops
    it and samples more prompts until the batch is full (the refill is the
    controller's job). Groups with fewer than two valid samples are dropped too:
    they have no group statistics either.

    Args:
        rewards: [G, n] float; valid: [G, n] bool.
        atol: rewards closer than this count as equal (0: exact equality).
    Returns:
        [G] bool, True = keep.
    """
    inf = torch.tensor(float("inf"), dtype=rewards.dtype)
    high = torch.where(valid, rewards, -inf).max(dim=1).values
    low = torch.where(valid, rewards, inf).min(dim=1).values
    return (valid.sum(dim=1) > 1) & (high - low > atol)


def overlong_penalty(
    lengths: torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment (eq. 13), a reward added to the task reward:

    - ``0`` for ``L <= max_len - buffer_len``,
    - ``(max_len - buffer_len - L) / buffer_len`` inside the buffer (linear, 0 to -1),
    - ``-1`` for ``L > max_len``,

    times ``penalty_factor`` (the paper's is 1). ``max_len`` is the paper's L_max (the
    generation cap), ``buffer_len`` its L_cache.

    Args:
        lengths: [N] completion lengths in tokens.
    Returns:
        [N] float penalties, in [-penalty_factor, 0].
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    expected = max_len - buffer_len
    excess = lengths.to(torch.float32) - expected
    return (-excess / buffer_len).clamp(-1.0, 0.0) * penalty_factor


def overlong_filter_mask(finish_reasons: Sequence[str]) -> torch.Tensor:
    """DAPO overlong filtering: ``[N]`` bool, False for samples truncated by the length
    cap (``finish_reason == "length"``), whose reward says little about the answer.
    The controller multiplies each row's loss mask by it, so truncated samples are not
    trained on; they still count in their group's reward statistics (they are real
    samples of the policy)."""
    return torch.tensor([reason != "length" for reason in finish_reasons], dtype=torch.bool)
