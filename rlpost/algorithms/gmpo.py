"""GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv 2507.20673): GRPO
with the clipped objective taken on the *geometric* mean of a sequence's token-level
importance ratios instead of their arithmetic mean, so one outlier token ratio moves
the objective (and the update) far less.

Per sequence i with advantage A_i and log ratios ``l_it = log pi(o_it) - log pi_old(o_it)``:

    J_i = sgn(A_i) * prod_t |min(r_it A_i, clip(r_it, e^-eps_low, e^eps_high) A_i)|^(1/|o_i|)
        = A_i * exp((1/|o_i|) sum_t sgn(A_i) min(sgn(A_i) l_it, sgn(A_i) clip(l_it, -eps_low, eps_high)))

Clipping is per token and in log space: ``algorithm.clip_eps_low/high`` are bounds on
the *log* ratio (the paper's range is (e^-0.4, e^0.4), i.e. 0.4 / 0.4), and, as in
PPO, only the pessimistic side clips (from above for A > 0, from below for A < 0).
A clipped token contributes its bound to the mean and no gradient.

The per-sequence loss ``-J_i`` is returned on every token of the sequence; aggregated
with ``seq-mean-token-mean`` that is the paper's ``-(1/G) sum_i J_i`` with its gradient
(``-A_i exp(mean) (1/|o_i|) sum_t grad l_it`` over the unclipped tokens). Deviation, as
in the reference implementation: A_i is the sequence's mean token advantage, which is
exactly the outcome advantage for every outcome estimator.
"""

from __future__ import annotations

import torch

from rlpost.algorithms.losses import _MAX_LOG_RATIO


def gmpo(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_eps_low: float, clip_eps_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GMPO loss in the ``POLICY_LOSSES`` signature: ``[B, T]`` in, per-token loss
    ``[B, T]`` (the sequence's ``-J_i`` on each of its tokens) out. Metric
    ``clip_frac``: tokens whose log ratio was clipped (no gradient)."""
    mask = mask.to(logp.dtype)
    lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1)
    seq_adv = (advantages * mask).sum(dim=-1, keepdim=True) / lengths  # [B, 1]
    sign = torch.sign(seq_adv)
    log_ratio = logp - old_logp
    clipped = log_ratio.clamp(-clip_eps_low, clip_eps_high)
    # The pessimistic branch of each token: min(sgn * l, sgn * clip(l)), back in l's sign.
    kept = sign * torch.minimum(sign * log_ratio, sign * clipped)
    seq_log_ratio = ((kept * mask).sum(dim=-1, keepdim=True) / lengths).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    loss = -seq_adv * torch.exp(seq_log_ratio)  # [B, 1]: -J_i
    was_clipped = sign * clipped < sign * log_ratio  # never for A = 0, which has no gradient anyway
    return loss.expand_as(logp), {"clip_frac": was_clipped.to(logp.dtype)}
