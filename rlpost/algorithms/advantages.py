"""Advantage estimators: pure tensor functions over a step's rewards.

Rewards arrive as ``[G, n]`` (G prompt groups, n samples each) with a ``valid`` mask:
samples lost to infrastructure or reward-function failure are invalid and take no
part in their group's statistics (they get advantage 0 and are not trained on).
"""

from __future__ import annotations

import torch


def grpo_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, *, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantage (Shao et al. 2024, DeepSeekMath, eq. 3 outcome supervision):
    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``.

    ``std`` is the unbiased sample standard deviation of the valid samples of the group
    (as in the reference implementations). ``norm_by_std=False`` keeps only the mean
    baseline, the Dr.GRPO correction (Liu et al. 2025), which removes the bias towards
    groups with low reward variance. A group with one valid sample or equal rewards
    gets advantage 0 (no learning signal, and no NaN).

    Args:
        rewards: [G, n] float.
        valid: [G, n] bool.
    Returns:
        [G, n] float advantages, 0 where invalid.
    """
    valid_f = valid.to(rewards.dtype)
    count = valid_f.sum(dim=1, keepdim=True)
    mean = (rewards * valid_f).sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = (rewards - mean) * valid_f
    if norm_by_std:
        var = (centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        centred = centred / (var.sqrt() + eps)
    return torch.where(count > 1, centred, torch.zeros_like(centred))


ADVANTAGE_ESTIMATORS = {"grpo": grpo_advantages}
