"""Algorithm code: pure tensor functions with no Ray, engine or model imports.

A recipe names its algorithm (``algorithm.name``): ``ALGORITHMS`` and
``make_algorithm`` (``registry.py``) build the ``Algorithm`` object
(``algorithm.py``) that says what a step needs and computes its advantages. Its parts
are picked by name through these registries:

- ``ADVANTAGE_ESTIMATORS`` (``algorithm.adv_estimator``): outcome estimators
  ``(rewards[G, n], valid[G, n], **options) -> [G, n]`` and token-level ``gae``.
- ``KL_ESTIMATORS`` (``algorithm.kl_estimator``): ``(logp, ref_logp) -> [B, T]``.
- ``POLICY_LOSSES`` (``algorithm.policy_loss``):
  ``(logp, old_logp, advantages, mask, **options) -> (loss[B, T], metrics)``.
- ``OFF_POLICY_CORRECTIONS`` (``algorithm.off_policy.correction``): weights of each
  token's loss from the behaviour ratio ``pi_old / pi_rollout`` (``off_policy.py``).
- ``LOSS_AGGREGATIONS`` (``algorithm.loss_agg``):
  ``(values, mask, global_num_tokens, global_num_seqs, norm_len) -> scalar``.

See docs/algorithms.md for the formulas and papers.
"""

from rlpost.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    OUTCOME_ADVANTAGE_ESTIMATORS,
    TOKEN_ADVANTAGE_ESTIMATORS,
    discounted_returns,
    gae,
    grpo_advantages,
    last_token_scores,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    reinforce_pp_kl_advantages,
    reinforce_pp_token_advantages,
    remax_advantages,
    rloo_advantages,
    whiten,
)
from rlpost.algorithms.aggregation import (
    LOSS_AGGREGATIONS,
    count_sequences,
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
)
from rlpost.algorithms.dapo import dynamic_sampling_keep, overlong_filter_mask, overlong_penalty
from rlpost.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty_rewards,
    low_var_kl,
    make_kl_controller,
    mean_sequence_kl,
)
from rlpost.algorithms.loss_fn import (
    PolicyLossSpec,
    ValueLossSpec,
    make_advantage_fn,
    make_policy_loss_fn,
    make_value_loss_fn,
    policy_loss_fn,
    value_loss_fn,
)
from rlpost.algorithms.losses import cispo, clipped_value_loss, gspo, ppo_clip, ppo_clip_loss
from rlpost.algorithms.off_policy import (
    OFF_POLICY_CORRECTIONS,
    OffPolicyCorrection,
    behaviour_ratios,
    correction_of,
    off_policy_metrics,
    off_policy_weights,
)
from rlpost.algorithms.registry import ALGORITHMS, POLICY_LOSSES, make_algorithm

__all__ = [
    "ADVANTAGE_ESTIMATORS", "OUTCOME_ADVANTAGE_ESTIMATORS", "TOKEN_ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES", "ALGORITHMS", "make_algorithm",
    "grpo_advantages", "rloo_advantages", "reinforce_pp_advantages", "reinforce_pp_baseline_advantages",
    "remax_advantages", "reinforce_pp_token_advantages", "reinforce_pp_kl_advantages", "gae", "whiten",
    "discounted_returns",
    "last_token_scores",
    "kl_k1", "kl_k2", "kl_k3", "low_var_kl", "kl_penalty_rewards", "mean_sequence_kl",
    "AdaptiveKLController", "FixedKLController", "make_kl_controller",
    "ppo_clip_loss", "ppo_clip", "gspo", "cispo", "clipped_value_loss",
    "token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm", "count_sequences",
    "PolicyLossSpec", "ValueLossSpec", "policy_loss_fn", "value_loss_fn",
    "make_policy_loss_fn", "make_value_loss_fn", "make_advantage_fn",
    "dynamic_sampling_keep", "overlong_penalty", "overlong_filter_mask",
    "OFF_POLICY_CORRECTIONS", "OffPolicyCorrection", "behaviour_ratios", "correction_of", "off_policy_weights",
    "off_policy_metrics",
]
