"""Policy and value losses: pure tensor functions, ``[B, T]`` in and out.

Every policy loss (``POLICY_LOSSES``, in ``rlpost.algorithms.registry``) has the signature
``(logp, old_logp, advantages, mask, **options) -> (per_token_loss[B, T], metrics)``
where ``metrics`` maps a name to a per-token ``[B, T]`` float tensor (e.g. a 0/1
"was clipped" indicator) that the LossFn averages over tokens. ``logp`` carries the
gradient; ``old_logp`` (the policy that sampled, or the pre-update policy) and
``advantages`` do not. Reduction to a scalar is the aggregation's job
(``rlpost.algorithms.aggregation``), never the loss's.
"""

from __future__ import annotations

import torch

from rlpost.algorithms.aggregation import LOSS_AGGREGATIONS, token_mean  # noqa: F401  (re-export)

# exp() of a log ratio beyond this overflows float32 long before it means anything.
_MAX_LOG_RATIO = 20.0


def _ppo_clip(logp, old_logp, advantages, clip_eps_low, clip_eps_high, dual_clip_c):
    log_ratio = (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = clipped < unclipped
    dual = torch.zeros_like(was_clipped)
    if dual_clip_c is not None:
        cap = -dual_clip_c * advantages
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
    return loss, was_clipped | dual, dual


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017), per token:
    ``-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)`` with ``r = exp(logp - old_logp)``.
    Separate low/high bounds allow DAPO's clip-higher; equal bounds are plain PPO.

    ``dual_clip_c`` (Ye et al. 2020, "Mastering Complex Control in MOBA Games", c = 3
    there): for ``A < 0`` the loss is further capped at ``-c * A``. Without it a token
    whose ratio has grown huge under a negative advantage contributes an unbounded
    loss (gradient ``-A * r``); with it, beyond ``r = c`` the token contributes a
    constant and no gradient. None disables it; it must be > 1.

    Returns (per-token loss [B, T], clipped indicator [B, T] as float). The indicator
    marks tokens whose loss is a clipped branch (zero gradient), dual clip included.
    """
    loss, was_clipped, _ = _ppo_clip(logp, old_logp, advantages, clip_eps_low, clip_eps_high, dual_clip_c)
    return loss, was_clipped.to(logp.dtype)


def ppo_clip(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_eps_low: float, clip_eps_high: float, dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``ppo_clip_loss`` in the registry signature; metrics ``clip_frac`` (any clip) and,
    with a dual clip, ``dual_clip_frac`` (tokens capped at ``-c * A``)."""
    loss, was_clipped, dual = _ppo_clip(logp, old_logp, advantages, clip_eps_low, clip_eps_high, dual_clip_c)
    metrics = {"clip_frac": was_clipped.to(logp.dtype)}
    if dual_clip_c is not None:
        metrics["dual_clip_frac"] = dual.to(logp.dtype)
    return loss, metrics


def gspo(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_eps_low: float, clip_eps_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): the importance
    ratio is per *sequence*, ``s_i = exp(mean_t log(pi(y_it) / pi_old(y_it)))`` over the
    sequence's masked tokens, and clipping acts on ``s_i``.

    Written in the paper's GSPO-token form (their eq. for ``s_i,t``):
    ``s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)]``, numerically ``s_i`` on every token, with
    gradient ``s_i * grad log pi(y_it)``. Per-token loss ``-min(s_it A_it, clip(s_it) A_it)``
    aggregated with ``seq-mean-token-mean`` is then exactly the paper's objective and
    gradient (``s_i A_i / |y_i| * sum_t grad log pi``); with outcome advantages (equal
    over a sequence's tokens) it equals sequence-level GSPO. The paper's clip range is
    tiny (3e-4 / 4e-4), because it bounds a per-token geometric mean.

    Metric ``clip_frac``: tokens of sequences whose ratio was clipped.
    """
    mask = mask.to(logp.dtype)
    log_ratio = (logp - old_logp) * mask
    seq_log_ratio = log_ratio.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    seq_log_ratio = seq_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    # value: s_i; gradient: s_i * d logp_t (the stop-gradients of the GSPO-token form)
    ratio = torch.exp(logp - logp.detach() + seq_log_ratio.detach())
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, {"clip_frac": (clipped < unclipped).to(logp.dtype)}


def cispo(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_eps_low: float, clip_eps_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, 2025): clip the importance-sampling *weight* instead of the
    update, ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi``. Unlike PPO-clip,
    a token outside the trust region keeps a (bounded) gradient ``-clip(r) * A``
    instead of none, so rare high-ratio tokens (the "fork" tokens of reasoning) still
    learn. The paper only truncates from above (no ``eps_low``): set
    ``clip_eps_low >= 1`` for that. Aggregate with ``token-mean`` as the paper does.

    The loss *value* (``-w A log pi``) is not a surrogate objective; only its gradient
    is meaningful. Metric ``clip_frac``: tokens whose weight was truncated.
    """
    ratio = torch.exp((logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)).detach()
    weight = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = -weight * advantages * logp
    return loss, {"clip_frac": (weight != ratio).to(logp.dtype)}


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *, value_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO value loss with value clipping (the PPO2 baselines form):
    ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``. Clipping keeps the
    critic from moving further than ``c`` from the values used to compute the
    advantages. ``value_clip=None``: plain ``0.5 * (V - R)^2``.

    Args:
        values: [B, T] critic output (with gradient); old_values: [B, T] the values
            GAE used; returns: [B, T] GAE returns.
    Returns:
        (per-token loss [B, T], clipped indicator [B, T]: the clipped branch was taken).
    """
    loss = (values - returns) ** 2
    if value_clip is None:
        return 0.5 * loss, torch.zeros_like(loss)
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    clipped_loss = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(loss, clipped_loss), (clipped_loss > loss).to(values.dtype)
