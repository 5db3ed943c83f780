"""LossFns (``rlpost.engines.base.LossFn``) assembled from the registries: any policy
loss + any aggregation + an optional KL-to-reference loss term + an entropy bonus,
and the critic's clipped value loss.

A recipe's ``AlgorithmConfig`` is converted once into a frozen spec here; the LossFn
is ``functools.partial(module_function, spec)``, which pickles (it crosses to Ray
actors) and never reads the config again.

Contract: the loss is divided by global denominators (``rlpost.algorithms.aggregation``)
so gradients sum over micro-batches and ranks. Metrics are additive too: each is a
token-mean contribution (divided by ``global_num_tokens``) whatever the loss
aggregation, so ``clip_frac`` is a fraction of tokens and ``kl`` nats per token, except
``*/loss`` terms, which are contributions to the aggregated loss.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from rlpost.algorithms.aggregation import LOSS_AGGREGATIONS, USES_NORM_LEN, USES_NUM_SEQS, token_mean
from rlpost.algorithms.kl import KL_ESTIMATORS, kl_k3
from rlpost.algorithms.losses import clipped_value_loss
from rlpost.algorithms.off_policy import OffPolicyCorrection, correction_of, off_policy_weights
from rlpost.algorithms.registry import POLICY_LOSSES, make_algorithm


@dataclasses.dataclass(frozen=True)
class PolicyLossSpec:
    policy_loss: str = "ppo_clip"  # POLICY_LOSSES name
    loss_agg: str = "token-mean"  # LOSS_AGGREGATIONS name
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float | None = None  # ppo_clip only
    kl_loss_coef: float = 0.0  # KL-to-reference loss term; 0 when the KL is in the reward
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    norm_len: float = 0.0  # the constant L of seq-mean-token-sum-norm
    tis_cap: float | None = None  # truncated importance sampling cap; None = off (= off_policy token_tis)
    off_policy: OffPolicyCorrection = OffPolicyCorrection()  # rlpost.algorithms.off_policy

    def check(self) -> None:
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ValueError(f"tis_cap must be None or >= 1, got {self.tis_cap}")
        if self.tis_cap is not None and self.off_policy.enabled:
            raise ValueError(f"tis_cap is off_policy token_tis; set one, not both (off_policy={self.off_policy.kind})")
        self.off_policy.check()
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss must be one of {sorted(POLICY_LOSSES)}, got {self.policy_loss!r}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg must be one of {sorted(LOSS_AGGREGATIONS)}, got {self.loss_agg!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.dual_clip_c is not None and (self.policy_loss != "ppo_clip" or self.dual_clip_c <= 1):
            raise ValueError(f"dual_clip_c ({self.dual_clip_c}) applies to ppo_clip only and must be > 1")
        if self.loss_agg in USES_NORM_LEN and self.norm_len <= 0:
            raise ValueError(f"loss_agg={self.loss_agg!r} needs a constant length > 0 "
                             "(algorithm.loss_norm_len, or rollout.max_new_tokens)")

    def loss_options(self) -> dict:
        options = {"clip_eps_low": self.clip_eps_low, "clip_eps_high": self.clip_eps_high}
        if self.policy_loss == "ppo_clip":
            options["dual_clip_c"] = self.dual_clip_c
        return options

    def correction(self) -> OffPolicyCorrection:
        """The off-policy correction in force (``tis_cap`` is ``token_tis``)."""
        if self.tis_cap is not None:
            return OffPolicyCorrection("token_tis", cap=self.tis_cap)
        return self.off_policy


def _denominators(loss_agg: str, mb, norm_len: float) -> dict:
    # global_num_seqs is read only by the modes that need it, so token-mean LossFns
    # work on any TrainBatch.
    return {
        "global_num_tokens": mb.global_num_tokens,
        "global_num_seqs": mb.global_num_seqs if loss_agg in USES_NUM_SEQS else 0.0,
        "norm_len": norm_len,
    }


def policy_loss_fn(spec: PolicyLossSpec, out, mb) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and additive metrics for one micro-batch (``out: ModelOutput``,
    ``mb: TrainBatch``); bind ``spec`` with functools.partial (``make_policy_loss_fn``).
    ``mb.old_logprobs = None`` means "the detached ``out.logprobs``" (on-policy)."""
    mask = mb.loss_mask
    n = mb.global_num_tokens
    aggregate = functools.partial(LOSS_AGGREGATIONS[spec.loss_agg], **_denominators(spec.loss_agg, mb, spec.norm_len))
    # None: the update is exactly on-policy (rlpost.algorithms.on_policy) and the "old"
    # policy is this forward's, detached: ratio 1, same gradient as a separate pass.
    old = mb.old_logprobs if mb.old_logprobs is not None else out.logprobs.detach()
    per_token, loss_metrics = POLICY_LOSSES[spec.policy_loss](
        out.logprobs, old, mb.advantages, mask, **spec.loss_options())
    tis_metrics = {}
    correction = spec.correction()
    if correction.enabled and mb.rollout_logprobs is not None:
        # Weights carry no gradient: the correction reweighs the loss, it is not optimised.
        weight, rho, hit = off_policy_weights(correction, old, mb.rollout_logprobs, mask)
        per_token = per_token * weight
        if correction.kind == "token_tis":  # the names runs with algorithm.tis_cap have always logged
            tis_metrics = {"policy/tis_ratio_mean": token_mean(rho, mask, n).item(),
                           "policy/tis_capped_frac": token_mean(hit.float(), mask, n).item()}
    loss = aggregate(per_token, mask)
    metrics = {"policy/pg_loss": loss.item(), **tis_metrics}
    for name, value in loss_metrics.items():
        metrics[f"policy/{name}"] = token_mean(value, mask, n).item()
    # k3 between the policy being trained and the one that produced old_logprobs
    metrics["policy/approx_kl_old"] = token_mean(kl_k3(out.logprobs.detach(), old), mask, n).item()
    if mb.ref_logprobs is not None:
        kl = KL_ESTIMATORS[spec.kl_estimator](out.logprobs, mb.ref_logprobs)
        if spec.kl_loss_coef > 0:
            loss = loss + spec.kl_loss_coef * aggregate(kl, mask)
        metrics["policy/kl"] = token_mean(kl.detach(), mask, n).item()
    if out.entropy is not None:
        if spec.entropy_coef > 0:
            loss = loss - spec.entropy_coef * aggregate(out.entropy, mask)
        metrics["policy/entropy"] = token_mean(out.entropy.detach(), mask, n).item()
    metrics["policy/loss"] = loss.item()
    return loss, metrics


def make_policy_loss_fn(cfg, *, max_response_len: int | None = None):
    """The policy LossFn of an ``AlgorithmConfig``: a picklable partial.

    ``max_response_len`` (``rollout.max_new_tokens``) is the default constant length of
    ``seq-mean-token-sum-norm`` when ``algorithm.loss_norm_len`` is 0.
    """
    spec = PolicyLossSpec(
        policy_loss=make_algorithm(cfg).policy_loss,  # algorithm.policy_loss, or the algorithm's own
        loss_agg=cfg.loss_agg,
        clip_eps_low=cfg.clip_eps_low,
        clip_eps_high=cfg.clip_eps_high,
        dual_clip_c=cfg.dual_clip_c,
        # With the KL in the reward, kl_coef drives the reward penalty instead.
        kl_loss_coef=0.0 if cfg.kl_in_reward else cfg.kl_coef,
        kl_estimator=cfg.kl_estimator,
        entropy_coef=cfg.entropy_coef,
        norm_len=float(cfg.loss_norm_len or max_response_len or 0),
        tis_cap=cfg.tis_cap,
        off_policy=correction_of(cfg) if cfg.tis_cap is None else OffPolicyCorrection(),
    )
    spec.check()
    return functools.partial(policy_loss_fn, spec)


# ------------------------------------------------------------------- critic
@dataclasses.dataclass(frozen=True)
class ValueLossSpec:
    loss_agg: str = "token-mean"
    value_clip: float | None = 0.2  # None disables value clipping
    norm_len: float = 0.0


def value_loss_fn(spec: ValueLossSpec, out, mb) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic LossFn: clipped value loss aggregated like the policy loss. Reads
    ``out.values`` [B, T] (critic forward, with gradient) and ``mb.old_values`` /
    ``mb.returns`` [B, T] (from ``gae``)."""
    mask = mb.loss_mask
    n = mb.global_num_tokens
    per_token, clipped = clipped_value_loss(out.values, mb.old_values, mb.returns, value_clip=spec.value_clip)
    loss = LOSS_AGGREGATIONS[spec.loss_agg](per_token, mask, **_denominators(spec.loss_agg, mb, spec.norm_len))
    metrics = {
        "critic/vf_loss": loss.item(),
        "critic/vf_clip_frac": token_mean(clipped, mask, n).item(),
        "critic/values_mean": token_mean(out.values.detach(), mask, n).item(),
    }
    return loss, metrics


def make_value_loss_fn(cfg, *, max_response_len: int | None = None):
    spec = ValueLossSpec(loss_agg=cfg.loss_agg, value_clip=cfg.value_clip,
                         norm_len=float(cfg.loss_norm_len or max_response_len or 0))
    if spec.loss_agg in USES_NORM_LEN and spec.norm_len <= 0:
        raise ValueError(f"loss_agg={spec.loss_agg!r} needs a constant length > 0")
    return functools.partial(value_loss_fn, spec)


# --------------------------------------------------------------- advantages
def make_advantage_fn(cfg):
    """The outcome estimator of an ``AlgorithmConfig`` with its options bound:
    ``fn(rewards[G, n], valid[G, n], **call_args)``. Only ``remax`` takes a call
    argument (``baseline=``, the greedy rewards). ``gae`` needs a critic and is run by
    the ``PPO`` algorithm (``rlpost.algorithms.algorithm``)."""
    return make_algorithm(cfg).outcome_estimator()
