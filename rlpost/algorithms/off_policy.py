"""Off-policy corrections against the behaviour policy (``algorithm.off_policy``):
pure tensor functions, ``[B, T]`` in and out.

The rollout engine samples from ``pi_rollout``: other kernels and dtypes than the
trainer's, and in ``trainer.mode=one_step_off|async`` an older policy version. PPO's
"old" policy (``old_logprobs``, the trainer's log-probs before the update: a separate
pass, or one mini-batch's training forward detached) is therefore not
the policy that sampled, and the gradient is biased unless each token is reweighted by
the behaviour ratio ``rho_it = pi_old(o_it) / pi_rollout(o_it)``, where
``rollout_logprobs`` are the sampler's log-probs recorded at sampling time.

Each correction turns ``rho`` into a weight ``w`` ([B, T], no gradient) that multiplies
the per-token policy loss:

- ``token_tis`` truncated IS per token: ``w_it = min(rho_it, cap)`` (Yao et al. 2025,
  "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training").
- ``token_mask`` masked IS per token (IcePop, Ring-1T, "Every Step Evolves" 2025):
  ``w_it = rho_it`` inside ``[low, high]``, 0 outside, so tokens the two engines
  disagree on most take no part in the update.
- ``seq_tis`` / ``seq_mask``: the same on the sequence ratio, the geometric mean of
  the token ratios, ``rho_i = exp(sum_t m_it log rho_it / sum_t m_it)`` (one weight
  on every token of the sequence; masked IS at the sequence level as in Yao et al.'s
  follow-up and verl's rollout correction, with the geometric mean so that the
  weight does not explode with the length).

A correction only weighs; the aggregation still divides by every loss token of the
step, so masked tokens count in the denominator (as in IcePop's ``1 / |o_i|``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# exp() of a log ratio beyond this overflows float32 long before it means anything.
_MAX_LOG_RATIO = 20.0

OFF_POLICY_CORRECTIONS = ("none", "token_tis", "token_mask", "seq_tis", "seq_mask")


@dataclass(frozen=True)
class OffPolicyCorrection:
    """A correction and its bounds; ``cap`` applies to the ``*_tis`` kinds, ``low`` /
    ``high`` to the ``*_mask`` kinds."""

    kind: str = "none"  # one of OFF_POLICY_CORRECTIONS
    cap: float = 2.0
    low: float = 0.5
    high: float = 2.0

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def sequence_level(self) -> bool:
        return self.kind.startswith("seq_")

    @property
    def masks(self) -> bool:
        return self.kind.endswith("_mask")

    def check(self) -> None:
        if self.kind not in OFF_POLICY_CORRECTIONS:
            raise ValueError(f"off-policy correction must be one of {list(OFF_POLICY_CORRECTIONS)}, got {self.kind!r}")
        if self.cap < 1:
            raise ValueError(f"off-policy cap must be >= 1 (a weight bound above the on-policy 1), got {self.cap}")
        if not 0 <= self.low <= 1 <= self.high:
            raise ValueError(f"off-policy band must hold the on-policy ratio 1: 0 <= low <= 1 <= high, "
                             f"got low={self.low}, high={self.high}")


def behaviour_ratios(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                     sequence_level: bool) -> torch.Tensor:
    """``rho`` [B, T]: ``pi_old / pi_rollout`` per token, or the sequence's geometric
    mean of them on each of its tokens. Positions outside ``mask`` hold 1 (their log
    ratio is not read), so padding never contributes."""
    mask = mask.to(torch.float32)
    log_ratio = (old_logprobs.float() - rollout_logprobs.float()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO) * mask
    if sequence_level:
        per_seq = log_ratio.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
        log_ratio = per_seq.expand_as(log_ratio) * mask
    return log_ratio.exp()


def off_policy_weights(correction: OffPolicyCorrection, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, rho, hit), all [B, T] and detached: the weight that multiplies each
    token's policy loss, the behaviour ratio it came from, and where the correction
    acted (``*_tis``: the ratio was truncated at ``cap``; ``*_mask``: the token was
    masked out). ``kind="none"`` gives weight 1 and no hits."""
    rho = behaviour_ratios(old_logprobs, rollout_logprobs, mask, correction.sequence_level).detach()
    if not correction.enabled:
        return torch.ones_like(rho), rho, torch.zeros_like(rho, dtype=torch.bool)
    if correction.masks:
        keep = (rho >= correction.low) & (rho <= correction.high)
        return torch.where(keep, rho, torch.zeros_like(rho)), rho, ~keep & (mask > 0)
    return rho.clamp(max=correction.cap), rho, (rho > correction.cap) & (mask > 0)


def off_policy_metrics(correction: OffPolicyCorrection, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                       mask: torch.Tensor) -> dict[str, float]:
    """The step's ratio distribution, over the units the correction weighs (loss tokens
    for ``token_*``, sequences with a loss token for ``seq_*``): ``off_policy/ratio_mean``,
    ``ratio_min``, ``ratio_max`` and the share it acted on, ``off_policy/masked_frac``
    (``*_mask``) or ``off_policy/capped_frac`` (``*_tis``). Computed on the whole batch
    (not per micro-batch) because a maximum does not add up over pieces."""
    _, rho, hit = off_policy_weights(correction, old_logprobs, rollout_logprobs, mask)
    mask = mask > 0
    if correction.sequence_level:
        rows = mask.any(dim=-1)
        first = mask.float().argmax(dim=-1)  # any loss token of a row carries its ratio
        values = rho.gather(1, first.unsqueeze(1)).squeeze(1)[rows]
        hits = hit.any(dim=-1)[rows]
    else:
        values, hits = rho[mask], hit[mask]
    if values.numel() == 0:
        return {}
    share = "off_policy/masked_frac" if correction.masks else "off_policy/capped_frac"
    return {"off_policy/ratio_mean": values.mean().item(), "off_policy/ratio_min": values.min().item(),
            "off_policy/ratio_max": values.max().item(), share: hits.float().mean().item()}


def correction_of(cfg) -> OffPolicyCorrection:
    """The correction an ``AlgorithmConfig`` asks for: ``algorithm.off_policy``, or
    ``algorithm.tis_cap`` (its older spelling of ``token_tis``; the config check refuses
    both at once)."""
    if cfg.tis_cap is not None:
        return OffPolicyCorrection("token_tis", cap=cfg.tis_cap)
    op = cfg.off_policy
    return OffPolicyCorrection(op.correction, cap=op.cap, low=op.low, high=op.high)
