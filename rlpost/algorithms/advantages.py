"""Advantage estimators: pure tensor functions.

Outcome-reward estimators take a step's rewards as ``[G, n]`` (G prompt groups, n
samples each) with a ``valid`` mask and share the signature
``(rewards[G, n], valid[G, n], **options) -> advantages[G, n]``. Samples lost to
infrastructure or reward-function failure are invalid: they take no part in any
statistic and get advantage 0. No estimator returns NaN, whatever the rewards (equal
rewards, a group of one, an all-invalid batch). The controller broadcasts each
sample's advantage over its completion tokens.

Token-level estimators (``gae``) work on ``[B, T]`` tensors aligned as in
``rlpost.types``: per-token rewards, critic values and the loss mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlpost.algorithms.kl import kl_penalty_rewards


def _masked_mean_std(x: torch.Tensor, mask: torch.Tensor):
    """Mean and unbiased std of ``x`` over all positions where ``mask`` (float 0/1) is 1,
    and their count; fewer than two positions give std 0 (never NaN)."""
    count = mask.sum()
    mean = (x * mask).sum() / count.clamp(min=1)
    sq = ((x - mean) ** 2 * mask).sum()
    var = sq / (count - 1).clamp(min=1) if count > 1 else torch.zeros_like(sq)
    return mean, var.sqrt(), count


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


def rloo_advantages(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): each sample's baseline is the mean
    reward of the *other* valid samples of its group,
    ``A_i = r_i - (sum_j r_j - r_i) / (k - 1)`` = ``k / (k - 1) * (r_i - mean)``,
    with k the group's valid count. No std normalisation (the paper has none).
    A group with fewer than two valid samples has no baseline and gets 0.

    Args/returns as ``grpo_advantages``.
    """
    valid_f = valid.to(rewards.dtype)
    count = valid_f.sum(dim=1, keepdim=True)
    mean = (rewards * valid_f).sum(dim=1, keepdim=True) / count.clamp(min=1)
    # The k / (k - 1) form, not (sum - r_i) / (k - 1): the subtraction of nearly equal
    # sums leaves rounding noise where the rewards are all equal and A must be 0.
    adv = count / (count - 1).clamp(min=1) * (rewards - mean) * valid_f
    return torch.where(count > 1, adv, torch.zeros_like(adv))


def reinforce_pp_advantages(rewards: torch.Tensor, valid: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ (Hu 2025), outcome form: rewards normalised over the *whole batch*
    instead of per group, ``A_i = (r_i - mean_batch(r)) / (std_batch(r) + eps)``
    (unbiased std over every valid sample of the step).

    This outcome form is the paper's estimator when the KL is a loss term or off. With
    the KL in the reward the paper works per token: ``reinforce_pp_kl_advantages``,
    which the controller uses then.
    """
    valid_f = valid.to(rewards.dtype)
    mean, std, count = _masked_mean_std(rewards, valid_f)
    adv = (rewards - mean) / (std + eps) * valid_f
    return adv if count > 1 else torch.zeros_like(adv)


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu 2025, the variant for group sampling): subtract the
    group mean, then divide by the std of those centred rewards over the whole batch:
    ``A'_i = r_i - mean_group(r)``, ``A_i = A'_i / (std_batch(A') + eps)``.

    The paper also subtracts ``mean_batch(A')``; it is exactly 0 here because every
    group's centred rewards sum to 0, so it is left out. Unlike verl (which whitens over
    tokens) the batch std is over samples, so long completions do not weigh more in it.
    A group of one centres to 0 and still counts in the batch std, as in the paper's
    formula.
    """
    valid_f = valid.to(rewards.dtype)
    count = valid_f.sum(dim=1, keepdim=True)
    mean = (rewards * valid_f).sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = (rewards - mean) * valid_f
    _, std, total = _masked_mean_std(centred, valid_f)
    return centred / (std + eps) if total > 1 else torch.zeros_like(centred)


def remax_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, *, baseline: torch.Tensor,
    baseline_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """ReMax (Li et al. 2023): the baseline of a prompt is the reward of one extra
    *greedy* rollout of it, ``A_i = r_i - r(greedy)``. No std normalisation (the
    paper has none). Works for groups of one, since the baseline is not a group
    statistic.

    Args:
        rewards, valid: [G, n] as for every outcome estimator.
        baseline: [G] float, the greedy rollout's reward per prompt.
        baseline_valid: [G] bool; False where the greedy rollout's reward failed, which
            gives the whole group advantage 0 (there is no baseline). None = all valid.
    """
    if baseline.shape != rewards.shape[:1]:
        raise ValueError(f"baseline must have shape [G] = {tuple(rewards.shape[:1])}, got {tuple(baseline.shape)}")
    keep = valid if baseline_valid is None else valid & baseline_valid[:, None]
    adv = rewards - baseline[:, None]
    return torch.where(keep, adv, torch.zeros_like(adv))


# ---------------------------------------------------------------- token level
def whiten(values: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening: ``(x - mean) / (std + eps)`` over the positions where ``mask``
    is 1 (unbiased std), 0 elsewhere. Used on GAE advantages over the whole step's
    batch (call it before splitting into mini-batches, or the statistics change).
    Fewer than two masked positions: returns the centred values (0), never NaN.
    """
    mask = mask.to(values.dtype)
    mean, std, _ = _masked_mean_std(values, mask)
    return (values - mean) / (std + eps) * mask


def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per token:
    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``,
    returns ``R_t = A_t + V_t`` (the critic's regression target).

    Only positions with ``mask == 1`` are steps of the episode. Unmasked positions
    (prompt, right padding, or holes such as tool output in a multi-turn row) are
    skipped: the next value and the running advantage carry across them, and their
    rewards are ignored, so rewards must sit on masked tokens (``last_token_scores``).
    The last masked token of a row is terminal (``V = 0`` after it): reaching EOS and
    hitting the length cap are both treated as the end of the episode, as in the
    common LLM PPO implementations.

    Args:
        token_rewards: [B, T] float.
        values: [B, T] float, ``values[b, t]`` = critic's value of the state before
            token t (aligned like ``logprobs``), detached.
        mask: [B, T] float/bool.
        gamma: discount; lam: GAE lambda.
    Returns:
        (advantages [B, T], returns [B, T]), both 0 outside ``mask``; not whitened.
    """
    mask = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    out = torch.zeros_like(values)
    for t in range(values.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = m * (delta + gamma * lam * running) + (1 - m) * running
        next_value = m * values[:, t] + (1 - m) * next_value
        out[:, t] = running
    advantages = out * mask
    return advantages, (advantages + values) * mask


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """Discounted return ``G_t = r_t + gamma * G_next`` where ``next`` is the next
    masked position (unmasked positions are skipped as in ``gae``, so the discount
    counts masked steps); 0 outside ``mask``. This is GAE with a zero critic and
    ``lam = 1``."""
    advantages, _ = gae(token_rewards, torch.zeros_like(token_rewards), mask, gamma=gamma, lam=1.0)
    return advantages


def reinforce_pp_token_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0
) -> torch.Tensor:
    """REINFORCE++ as in the paper (Hu 2025): the per-token return of the outcome
    reward minus the per-token KL penalty (``kl_penalty_rewards``), whitened over every
    token of the batch. Same normalisation as verl/OpenRLHF (token-weighted)."""
    return whiten(discounted_returns(token_rewards, mask, gamma=gamma), mask)


def reinforce_pp_kl_advantages(
    scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *,
    coef: float, estimator: str = "k1", gamma: float = 1.0,
) -> torch.Tensor:
    """REINFORCE++ with the KL in the reward, as the paper (and OpenRLHF/verl) do it:
    the outcome score ``scores[B]`` on each row's last masked token, ``coef * kl_t`` off
    every masked token (``kl_penalty_rewards``), per-token returns, whitened over all
    tokens of the batch (``reinforce_pp_token_advantages``). Token ``t`` is charged only
    the KL of itself and the tokens after it, not the whole sequence's. [B, T]."""
    token_rewards, _ = kl_penalty_rewards(last_token_scores(scores, mask), logp, ref_logp, mask, coef, estimator)
    return reinforce_pp_token_advantages(token_rewards, mask, gamma=gamma)


def last_token_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each row's outcome score ``scores[B]`` on its last masked token:
    the ``token_level_scores`` for ``kl_penalty_rewards`` and ``gae``. Fully masked
    rows get all zeros."""
    mask = mask.to(scores.dtype)
    width = mask.shape[1]
    positions = torch.arange(width, device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values
    out = torch.zeros_like(mask)
    rows = torch.nonzero(last >= 0).flatten()
    out[rows, last[rows]] = scores[rows]
    return out


# Outcome estimators: (rewards[G, n], valid[G, n], **options) -> [G, n].
OUTCOME_ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
    "remax": remax_advantages,
}
# Token-level estimators that need a critic: (token_rewards, values, mask, gamma, lam).
TOKEN_ADVANTAGE_ESTIMATORS = {"gae": gae}
# Every name a recipe may put in ``algorithm.adv_estimator``.
ADVANTAGE_ESTIMATORS = {**OUTCOME_ADVANTAGE_ESTIMATORS, **TOKEN_ADVANTAGE_ESTIMATORS}
