"""Per-token KL estimators between the policy and a reference (Schulman 2020,
"Approximating KL divergence"). With ``log_ratio = logp - ref_logp`` for tokens
sampled from the policy:

- k1 = log_ratio                                unbiased, high variance, can be < 0
- k2 = 0.5 * log_ratio**2                      biased, low variance
- k3 = exp(-log_ratio) - 1 + log_ratio         unbiased, low variance, always >= 0
                                               (the GRPO paper's estimator)
"""

from __future__ import annotations

import torch


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    # Clamp the log ratio before exp so one badly off token cannot overflow to inf.
    neg_log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(neg_log_ratio) - 1.0 - neg_log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
