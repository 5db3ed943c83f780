"""The GRPO loss as a LossFn (see rlpost.engines.base): PPO-clip surrogate on
group-normalised advantages, token-level aggregation, optional k-estimator KL to the
reference as a loss term (DeepSeekMath, Shao et al. 2024), optional entropy bonus.

Deviation from the paper: the loss is averaged over all tokens of the step
(token-mean, as in DAPO) rather than per sequence then per group, so long and short
completions weigh by their tokens.
"""

from __future__ import annotations

from rlpost.algorithms.kl import KL_ESTIMATORS, kl_k3
from rlpost.algorithms.losses import LOSS_AGGREGATIONS, ppo_clip_loss
from rlpost.config.schema import AlgorithmConfig
from rlpost.types import ModelOutput, TrainBatch


def grpo_loss(cfg: AlgorithmConfig, out: ModelOutput, mb: TrainBatch):
    """Loss and additive metrics for one micro-batch (bind ``cfg`` with functools.partial).

    Metrics are contributions to step-level token means: summing them over
    micro-batches and ranks gives the mean over every trained token of the step.
    """
    mask = mb.loss_mask
    n = mb.global_num_tokens
    aggregate = LOSS_AGGREGATIONS[cfg.loss_agg]
    pg, clipped = ppo_clip_loss(
        out.logprobs, mb.old_logprobs, mb.advantages,
        clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
    )
    loss = aggregate(pg, mask, n)
    metrics = {
        "policy/pg_loss": loss.item(),
        "policy/clip_frac": aggregate(clipped, mask, n).item(),
        # k3 between the policy being trained and the one that produced old_logprobs
        "policy/approx_kl_old": aggregate(kl_k3(out.logprobs.detach(), mb.old_logprobs), mask, n).item(),
    }
    if mb.ref_logprobs is not None:
        kl = KL_ESTIMATORS[cfg.kl_estimator](out.logprobs, mb.ref_logprobs)
        kl_term = aggregate(kl, mask, n)
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl_term
        metrics["policy/kl"] = kl_term.item()
    if out.entropy is not None:
        entropy = aggregate(out.entropy, mask, n)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * entropy
        metrics["policy/entropy"] = entropy.item()
    metrics["policy/loss"] = loss.item()
    return loss, metrics
