"""Policy losses and loss aggregation: pure tensor functions, ``[B, T]`` in and out."""

from __future__ import annotations

import torch


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017), per token:
    ``-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)`` with ``r = exp(logp - old_logp)``.
    Separate low/high bounds allow DAPO's clip-higher; equal bounds are plain PPO.

    Returns (per-token loss [B, T], clipped indicator [B, T] as float).
    """
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # avoid inf ratios on far-off tokens
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).to(logp.dtype)
    return loss, was_clipped


def token_mean(values: torch.Tensor, mask: torch.Tensor, global_num_tokens: float) -> torch.Tensor:
    """Sum over this micro-batch's masked tokens divided by the step's *global* token
    count, so summing over micro-batches and ranks gives the mean over all tokens of
    the step, independent of how the batch was split (the DAPO token-level loss)."""
    if global_num_tokens <= 0:
        raise ValueError("global_num_tokens must be > 0: the step has no trainable tokens")
    return (values * mask).sum() / global_num_tokens


LOSS_AGGREGATIONS = {"token-mean": token_mean}
