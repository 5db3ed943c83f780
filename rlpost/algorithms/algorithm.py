"""The ``Algorithm`` object: what a run's RL algorithm needs from a step, and how it
turns the step's rewards into per-token advantages.

The controller, the collector, the launchers and the config checks ask this object
(``needs_critic``, ``needs_reference``, ``greedy_baseline``, ``old_logprobs_reason``,
``single_turn_only``) instead of comparing estimator names. ``make_algorithm``
(``rlpost.algorithms.registry``) builds it from ``algorithm.name``.

An algorithm is an advantage estimator (``ADVANTAGE_ESTIMATORS``) and a policy loss
(``POLICY_LOSSES``) plus the knobs of ``AlgorithmConfig``. The class follows from the
estimator, because that is what changes the step: ``Algorithm`` runs the outcome
estimators, ``ReinforcePP`` adds per-token returns when the KL is in the reward,
``ReMax`` asks for one extra greedy rollout per prompt, ``PPO`` asks for a critic and
runs GAE. Everything here is pure tensor code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from rlpost.algorithms.advantages import (
    OUTCOME_ADVANTAGE_ESTIMATORS,
    gae,
    last_token_scores,
    reinforce_pp_kl_advantages,
    whiten,
)
from rlpost.algorithms.kl import kl_penalty_rewards

if TYPE_CHECKING:
    from rlpost.config.schema import AlgorithmConfig
    from rlpost.types import TrainBatch


@dataclass(frozen=True)
class AdvantageInputs:
    """What a step hands ``Algorithm.advantages`` besides the batch (whose
    ``loss_mask``, ``old_logprobs`` and ``ref_logprobs`` [B, T] it reads).

    Rows of the batch are the ``[G, n]`` samples in group-major order (B = G * n).
    """

    scores: torch.Tensor  # [G, n] (or [B]) outcome rewards as collected, before any KL penalty
    kl_coef: float  # this step's KL-penalty coefficient (the KL controller's value)
    rewards: torch.Tensor | None = None  # [G, n] what outcome estimators see (scores - summed KL); None = scores
    valid: torch.Tensor | None = None  # [G, n] bool, False where the reward failed; None = all valid
    estimator_args: dict = field(default_factory=dict)  # extra samples' results, e.g. ReMax's ``baseline``
    values: torch.Tensor | None = None  # [B, T] the critic's values of the batch (``needs_critic``)


@dataclass(frozen=True)
class Advantages:
    advantages: torch.Tensor  # [B, T], 0 outside the loss mask
    returns: torch.Tensor | None = None  # [B, T] the critic's regression targets (PPO)


@dataclass(frozen=True)
class Algorithm:
    """An outcome-reward algorithm (GRPO and its family: Dr.GRPO, DAPO, RLOO,
    REINFORCE++-baseline, GSPO, CISPO, GMPO): one advantage per sample from the rewards
    of its group (or batch), broadcast over the sample's completion tokens."""

    name: str  # the registry name (``algorithm.name``)
    estimator: str  # ADVANTAGE_ESTIMATORS name
    policy_loss: str  # POLICY_LOSSES name
    config: AlgorithmConfig = field(repr=False, compare=False)

    # What the step must provide besides the samples and their rewards.
    needs_critic: ClassVar[bool] = False  # a value model and its forward (PPO)
    greedy_baseline: ClassVar[bool] = False  # one extra greedy rollout per prompt, scored (ReMax)
    single_turn_only: ClassVar[str | None] = None  # why it cannot run multi-turn episodes; None = it can

    @property
    def needs_reference(self) -> bool:
        """Reference log-probs, for the KL term (a loss term, or the reward penalty)."""
        return self.config.kl_coef > 0

    def old_logprobs_reason(self) -> str | None:
        """Why the loss or the advantages read the policy's log-probs from before the
        update, which an exactly on-policy step could otherwise take from the training
        forward (``rlpost.algorithms.on_policy``); None = they do not."""
        # The off-policy corrections need none: they weigh the trainer's pre-update
        # log-probs against the sampler's inside the loss, where one mini-batch's training
        # forward gives exactly those values (detached).
        cfg = self.config
        if cfg.kl_in_reward and cfg.kl_coef > 0:
            # The summed-KL penalty, REINFORCE++'s per-token returns and PPO's token
            # rewards all read the sampling policy's log-probs before the update.
            return "algorithm.kl_in_reward shapes the reward with the pre-update log-probs"
        return None

    def describe(self) -> str:
        return f"algorithm {self.name}: adv_estimator={self.estimator}, policy_loss={self.policy_loss}"

    def outcome_estimator(self) -> Callable[..., torch.Tensor]:
        """The outcome estimator with its options bound:
        ``fn(rewards[G, n], valid[G, n], **estimator_args) -> [G, n]``."""
        if self.estimator not in OUTCOME_ADVANTAGE_ESTIMATORS:
            raise ValueError(f"{self.estimator!r} is not an outcome-reward estimator; "
                             f"those are {sorted(OUTCOME_ADVANTAGE_ESTIMATORS)}")
        options = {"norm_by_std": self.config.norm_adv_by_std} if self.estimator == "grpo" else {}
        return functools.partial(OUTCOME_ADVANTAGE_ESTIMATORS[self.estimator], **options)

    def advantages(self, batch: TrainBatch, inputs: AdvantageInputs) -> Advantages:
        """Per-token advantages of ``batch`` ([B, T]). Failed samples take no part in
        group statistics (``inputs.valid``) and have no trained tokens."""
        rewards = inputs.scores if inputs.rewards is None else inputs.rewards
        valid = torch.ones_like(rewards, dtype=torch.bool) if inputs.valid is None else inputs.valid
        per_sample = self.outcome_estimator()(rewards, valid, **inputs.estimator_args)
        return Advantages(per_sample.reshape(-1, 1).to(torch.float32) * (batch.loss_mask > 0))


class ReinforcePP(Algorithm):
    """REINFORCE++ (Hu 2025). Outcome form (batch-normalised rewards) when the KL is a
    loss term or off; with the KL in the reward, as the paper does it: each token its
    own KL-penalised return, whitened over the batch (``reinforce_pp_kl_advantages``),
    not one summed-KL advantage per sample."""

    def advantages(self, batch: TrainBatch, inputs: AdvantageInputs) -> Advantages:
        cfg = self.config
        if not cfg.kl_in_reward or batch.ref_logprobs is None:
            return super().advantages(batch, inputs)
        if batch.old_logprobs is None:
            raise ValueError(f"{self.name}: the KL in the reward needs the sampling policy's old log-probs")
        # Failed/filtered rows have no masked tokens, so they need no valid mask here.
        return Advantages(reinforce_pp_kl_advantages(
            inputs.scores.reshape(-1).to(torch.float32), batch.old_logprobs, batch.ref_logprobs, batch.loss_mask,
            coef=inputs.kl_coef, estimator=cfg.kl_estimator, gamma=cfg.gae_gamma))


class ReMax(Algorithm):
    """ReMax (Li et al. 2023): the baseline of a prompt is the reward of one extra
    greedy rollout of it; the collector draws and scores it (``estimator_args``)."""

    greedy_baseline = True
    single_turn_only = "ReMax's greedy baseline"


class PPO(Algorithm):
    """PPO with a critic (Schulman et al. 2017) as LLM RLHF runs it: the outcome score
    on the last completion token, the KL penalty (``kl_in_reward``) on every token,
    GAE (Schulman et al. 2016) over the critic's values, advantages whitened over the
    step. The critic itself (forward, update) is ``rlpost.step.critic``."""

    needs_critic = True
    single_turn_only = "PPO's per-token values (GAE)"

    def old_logprobs_reason(self) -> str | None:
        # The critic's warm-up freezes the policy: no training forward to take them from.
        return super().old_logprobs_reason() or f"{self.name} (adv_estimator={self.estimator}) with a critic"

    def advantages(self, batch: TrainBatch, inputs: AdvantageInputs) -> Advantages:
        if inputs.values is None:
            raise ValueError(f"{self.name}: GAE needs the critic's values (AdvantageInputs.values)")
        cfg, mask = self.config, batch.loss_mask
        token_rewards = last_token_scores(inputs.scores.reshape(-1).to(torch.float32), mask)
        if cfg.kl_in_reward and batch.ref_logprobs is not None:
            if batch.old_logprobs is None:
                raise ValueError(f"{self.name}: the KL in the reward needs the sampling policy's old log-probs")
            token_rewards, _ = kl_penalty_rewards(token_rewards, batch.old_logprobs, batch.ref_logprobs, mask,
                                                  inputs.kl_coef, cfg.kl_estimator)
        advantages, returns = gae(token_rewards, inputs.values, mask, gamma=cfg.gae_gamma, lam=cfg.gae_lambda)
        # Whitened over the whole step, before mini-batches split it (see ``whiten``).
        return Advantages(whiten(advantages, mask) if cfg.whiten_advantages else advantages, returns)
