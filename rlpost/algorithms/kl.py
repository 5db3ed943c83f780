"""KL to the reference policy: per-token estimators, the KL-in-reward penalty, and
the controllers of its coefficient.

Per-token estimators (Schulman 2020, "Approximating KL divergence"). With
``log_ratio = logp - ref_logp`` for tokens sampled from the policy:

- k1 = log_ratio                                unbiased, high variance, can be < 0
- k2 = 0.5 * log_ratio**2                      biased, low variance
- k3 = exp(-log_ratio) - 1 + log_ratio         unbiased, low variance, always >= 0
                                               (the GRPO paper's estimator)
- low_var_kl = k3 clamped to [-10, 10]         k3 with a bounded value and gradient,
                                               the name and clamp verl and OpenRLHF use

Two ways to use them: as a loss term (``kl_coef`` times the aggregated estimate, the
GRPO way, see ``rlpost.algorithms.loss_fn``) or subtracted from the per-token reward
before computing advantages (``kl_penalty_rewards``, the PPO-RLHF way of Ziegler et
al. 2019 / Ouyang et al. 2022, used by REINFORCE++ and ReMax).
"""

from __future__ import annotations

import math

import torch


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    # Clamp the log ratio before exp so one badly off token cannot overflow to inf.
    neg_log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(neg_log_ratio) - 1.0 - neg_log_ratio


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 clamped to [-10, 10] (k3 >= 0, so in effect capped at 10): one token far from
    the reference can then add at most 10 nats and no gradient beyond that."""
    return kl_k3(logp, ref_logp).clamp(-10.0, 10.0)


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "low_var_kl": low_var_kl}


def kl_penalty_rewards(
    token_level_scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL in the reward: ``r_t = score_t - coef * kl_t`` on every masked token
    (Ziegler et al. 2019 eq. 2, per token as in Ouyang et al. 2022).

    ``logp`` is the sampling policy's (the "old" log-probs), so this is computed once
    per step, with no gradient. k1 is the classic choice here: its expectation over a
    sequence is the sequence KL.

    Args:
        token_level_scores: [B, T], the outcome score on each row's last completion
            token (``rlpost.algorithms.advantages.last_token_scores``).
        logp, ref_logp, mask: [B, T].
        coef: the KL coefficient (a ``KLController``'s ``value``).
        estimator: a ``KL_ESTIMATORS`` name.
    Returns:
        (token rewards [B, T], per-token KL [B, T]), both 0 outside ``mask``.
    """
    mask = mask.to(logp.dtype)
    kl = KL_ESTIMATORS[estimator](logp.detach(), ref_logp.detach()) * mask
    return (token_level_scores - coef * kl) * mask, kl


def mean_sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over rows with at least one masked token of the row's summed KL (nats per
    sequence): the quantity Ziegler et al.'s adaptive controller compares with its
    target. (verl feeds its controller a per-token mean instead, so its targets are
    per token; ours are per sequence, as in the paper.)"""
    mask = mask.to(kl.dtype)
    rows = mask.sum(dim=1) > 0
    if not rows.any():
        return 0.0
    return float((kl * mask).sum(dim=1)[rows].mean())


class FixedKLController:
    """A constant KL coefficient; ``update`` is a no-op (so both controllers are
    interchangeable in the controller loop)."""

    def __init__(self, init_coef: float):
        self.value = float(init_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2):
    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``.

    The paper writes ``beta * (1 + K_beta * e)`` with ``K_beta = 0.1``; its code (and
    ours) uses ``K_beta = n_steps / horizon``, with ``n_steps`` the number of sequences
    in the update, so the adaptation speed does not depend on the batch size.
    ``current_kl`` is in the same units as ``target`` (``mean_sequence_kl``: nats per
    sequence).
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target ({target}) and horizon ({horizon}) must be > 0")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl is {current_kl}; refusing to update the KL coefficient")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


def make_kl_controller(init_coef: float, target: float | None, horizon: int):
    """Fixed when ``target`` is None, adaptive otherwise (``algorithm.kl_target``)."""
    if target is None:
        return FixedKLController(init_coef)
    return AdaptiveKLController(init_coef, target, horizon)
