"""PPO's critic stages of a step (an algorithm whose ``needs_critic``: ``ppo``), kept
out of the controller so its step stays one call per stage. The advantage math (GAE)
is the algorithm's (``rlpost.algorithms.algorithm.PPO``); this module runs the critic.

PPO (Schulman et al. 2017) with GAE (Schulman et al. 2016), as LLM RLHF runs it
(Ziegler et al. 2019; Ouyang et al. 2022): the outcome score sits on the last
completion token, the KL penalty (``kl_in_reward``) on every token, a value model
(the policy's base with a scalar head) estimates the value of each state, and GAE
turns rewards and values into per-token advantages and returns. The critic regresses
on those returns with the clipped value loss, its own optimizer, over the same
mini-batches and epochs as the policy.

``critic`` is a ``rlpost.workers.critic_group.CriticGroup`` on a cluster or a
``rlpost.local.LocalCriticGroup`` in process: ``forward_values(batch) -> [B, T]``,
``train_step(batch, loss_fn) -> metrics``, ``save(path)``, ``load(path)``.
"""

from __future__ import annotations

import dataclasses

import torch

from rlpost.algorithms import make_algorithm, make_value_loss_fn
from rlpost.algorithms.algorithm import AdvantageInputs
from rlpost.step.batching import mini_batches
from rlpost.config.schema import AlgorithmConfig, CriticConfig, RunConfig, TrainerConfig
from rlpost.errors import TrainingError
from rlpost.groups import CriticGroupLike
from rlpost.types import TrainBatch


def critic_trainer_config(cfg: RunConfig) -> TrainerConfig:
    """The TrainerConfig a critic engine is built from: the policy's, with the critic's
    learning rate and gradient clip."""
    return dataclasses.replace(cfg.trainer, lr=cfg.critic.lr, grad_clip=cfg.critic.grad_clip)


class CriticStages:
    """Values + GAE before the policy update, and the critic's own update."""

    def __init__(self, critic: CriticGroupLike, *, critic_cfg: CriticConfig, trainer: TrainerConfig,
                 algorithm: AlgorithmConfig, max_new_tokens: int, seed: int):
        self.critic, self.critic_cfg, self.trainer, self.seed = critic, critic_cfg, trainer, seed
        self.algorithm = make_algorithm(algorithm)
        self.loss_fn = make_value_loss_fn(algorithm, max_response_len=max_new_tokens)
        self.bad_updates = 0  # consecutive skipped (non-finite) critic updates

    @classmethod
    def of(cls, cfg: RunConfig, critic: CriticGroupLike) -> CriticStages:
        return cls(critic, critic_cfg=cfg.critic, trainer=cfg.trainer, algorithm=cfg.algorithm,
                   max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed)

    def policy_frozen(self, step: int) -> bool:
        """During ``critic.warmup_steps`` only the critic learns: GAE with an untrained
        critic (values 0) would give the policy advantages that are mostly noise."""
        return step <= self.critic_cfg.warmup_steps

    def advantages(self, batch: TrainBatch, scores: torch.Tensor, kl_coef: float) -> dict[str, float]:
        """Set ``batch.old_values``, ``batch.returns`` and ``batch.advantages`` (all [B, T],
        0 outside ``loss_mask``) and return driver-side critic metrics.

        ``scores``: [G, n] (or [B]) outcome rewards in batch row order, before any KL
        penalty. ``kl_coef``: the coefficient of this step's per-token KL penalty, used
        when ``algorithm.kl_in_reward`` and reference log-probs are present.
        """
        mask = batch.loss_mask
        values = self.critic.forward_values(batch).to(torch.float32) * mask
        out = self.algorithm.advantages(batch, AdvantageInputs(scores=scores, kl_coef=kl_coef, values=values))
        if out.returns is None:
            raise ValueError(f"{self.algorithm.name}: a critic's algorithm must return the value targets (returns)")
        batch.old_values, batch.returns, batch.advantages = values, out.returns, out.advantages
        return value_metrics(values, out.returns, mask)

    def update(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """``trainer.epochs`` passes of ``trainer.mini_batches`` critic optimizer steps
        over ``batch`` (which ``advantages`` filled); metrics averaged over updates."""
        tc = self.trainer
        # Its own shuffle, so the critic's mini-batches do not depend on the policy's.
        generator = torch.Generator().manual_seed(self.seed * 7919 + step + 104729)
        summed: dict[str, float] = {}
        updates = 0
        for mini in mini_batches(batch, tc.mini_batches, tc.epochs, generator):
            metrics = self.critic.train_step(mini, self.loss_fn)
            self._check_update(metrics, step)
            for key, value in metrics.items():
                summed[key] = summed.get(key, 0.0) + value
            updates += 1
        out = {(k if k.startswith("critic/") else f"critic/{k}"): v / max(updates, 1) for k, v in summed.items()}
        out["critic/updates"] = float(updates)
        return out

    def _check_update(self, metrics: dict[str, float], step: int) -> None:
        if not metrics["skipped"]:
            self.bad_updates = 0
            return
        self.bad_updates += 1
        limit = self.trainer.max_bad_steps
        if self.bad_updates > limit:
            raise TrainingError(f"step {step}: {self.bad_updates} critic updates in a row had a non-finite loss or "
                                f"gradient (trainer.max_bad_steps={limit}): lower critic.lr or check the reward")

    def save(self, path: str) -> None:
        self.critic.save(path)

    def load(self, path: str) -> None:
        self.critic.load(path)


def value_metrics(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Token means over ``mask`` of the pre-update values and returns, and the explained
    variance ``1 - Var(R - V) / Var(R)`` (1: perfect critic, 0: no better than a
    constant, negative: worse)."""
    m = mask.bool()
    v, r = values[m], returns[m]
    if r.numel() < 2:
        return {}
    var_r = r.var()
    explained = 1.0 - (r - v).var() / var_r if var_r > 0 else torch.tensor(0.0)
    return {"critic/old_values_mean": v.mean().item(), "critic/returns_mean": r.mean().item(),
            "critic/explained_variance": explained.item()}
