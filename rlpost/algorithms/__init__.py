"""Algorithm code: pure tensor functions with no Ray, engine or model imports.
Recipes pick them by name through these registries."""

from rlpost.algorithms.advantages import ADVANTAGE_ESTIMATORS, grpo_advantages
from rlpost.algorithms.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3
from rlpost.algorithms.losses import LOSS_AGGREGATIONS, ppo_clip_loss, token_mean

__all__ = [
    "ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS",
    "grpo_advantages", "kl_k1", "kl_k2", "kl_k3", "ppo_clip_loss", "token_mean",
]
