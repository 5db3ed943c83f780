"""The GRPO loss as a LossFn (see rlpost.engines.base): PPO-clip surrogate on
group-normalised advantages, optional k-estimator KL to the reference as a loss term
(DeepSeekMath, Shao et al. 2024), optional entropy bonus.

Kept for the tests that pin it; the controller binds ``make_policy_loss_fn``
(``rlpost.algorithms.loss_fn``). It is ``policy_loss_fn`` with the ``ppo_clip`` loss
and only the config fields GRPO has always had.

Deviation from the paper: with ``loss_agg=token-mean`` (the default) the loss is
averaged over all tokens of the step (as in DAPO) rather than per sequence then per
group, so long and short completions weigh by their tokens; ``seq-mean-token-mean``
is the paper's form.
"""

from __future__ import annotations

from rlpost.algorithms.loss_fn import PolicyLossSpec, policy_loss_fn
from rlpost.config.schema import AlgorithmConfig
from rlpost.types import ModelOutput, TrainBatch


def grpo_loss(cfg: AlgorithmConfig, out: ModelOutput, mb: TrainBatch):
    """Loss and additive metrics for one micro-batch (bind ``cfg`` with functools.partial).

    Metrics are contributions to step-level token means: summing them over
    micro-batches and ranks gives the mean over every trained token of the step.
    """
    spec = PolicyLossSpec(
        policy_loss="ppo_clip", loss_agg=cfg.loss_agg,
        clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
        kl_loss_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef,
    )
    return policy_loss_fn(spec, out, mb)
