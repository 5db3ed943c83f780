"""The GRPO controller: wires the components and drives them, one step at a time.

Components never reference the controller, and the controller never touches Ray:
it calls typed methods of the groups it is handed (``rlpost.workers`` on a cluster). Synchronous schedule: rollouts of step
``s`` are sampled by policy version ``s - 1`` (the weights after ``s - 1`` updates);
after the update the trainer pushes version ``s`` to every replica before step
``s + 1`` samples again, so every trained token is exactly on-policy.
"""

from __future__ import annotations

import logging
import time

import torch

from rlpost.algorithms import (
    KL_ESTIMATORS,
    count_sequences,
    make_advantage_fn,
    make_kl_controller,
    make_policy_loss_fn,
    mean_sequence_kl,
)
from rlpost.batching import build_train_batch, outcome_advantages_per_token, sampler_logprobs
from rlpost.checkpoint import CheckpointManager, ControllerState
from rlpost.config.schema import RunConfig
from rlpost.data.stream import PromptStream
from rlpost.errors import TrainingError, WorkerError
from rlpost.evaluation import evaluate
from rlpost.tracking import Tracker
from rlpost.types import PromptSample, SamplingParams, TrainBatch, Trajectory

log = logging.getLogger(__name__)


class Timer(dict):
    """Collects ``timing/<name>_s`` entries: ``with timer("rollout"): ...``."""

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer[f"timing/{name}_s"] = timer.get(f"timing/{name}_s", 0.0) + time.perf_counter() - self.t0

        return _Span()


class Controller:
    def __init__(self, cfg: RunConfig, *, trainer, rollout, rewards, weight_sync, stream: PromptStream,
                 val_samples: list[PromptSample], tracker: Tracker, checkpoints: CheckpointManager,
                 pad_id: int, use_reference: bool):
        self.cfg, self.trainer, self.rollout, self.rewards = cfg, trainer, rollout, rewards
        self.weight_sync = weight_sync
        self.stream, self.val_samples, self.tracker, self.checkpoints = stream, val_samples, tracker, checkpoints
        self.pad_id, self.use_reference = pad_id, use_reference
        self.loss_fn = make_policy_loss_fn(cfg.algorithm, max_response_len=cfg.rollout.max_new_tokens)
        self.advantage_fn = make_advantage_fn(cfg.algorithm)
        self.kl_controller = make_kl_controller(cfg.algorithm.kl_coef, cfg.algorithm.kl_target,
                                                cfg.algorithm.kl_horizon)
        self.policy_version = 0
        self._warned_length_cap = False

    # ------------------------------------------------------------------ loop
    def run(self, start_step: int = 0) -> dict:
        """Train from ``start_step`` to ``trainer.total_steps``; returns the last metrics."""
        cfg, last = self.cfg, {}
        self.tracker.start(start_step)
        if start_step == 0 and cfg.eval.every > 0:
            self.tracker.log(0, self.evaluate())
        for step in range(start_step + 1, cfg.trainer.total_steps + 1):
            metrics = self.step(step)
            final = step == cfg.trainer.total_steps
            if cfg.eval.every > 0 and (step % cfg.eval.every == 0 or final):
                metrics.update(self.evaluate())
            self.tracker.log(step, metrics)
            if final or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                self.save(step)
            last = metrics
        return last

    def step(self, step: int) -> dict:
        """One GRPO step; returns its metrics."""
        timer, t0 = Timer(), time.perf_counter()
        # 1. Draw this step's prompts.
        prompts = self.stream.next_batch()
        # 2. Sample rollout.n completions per prompt with policy version step - 1.
        with timer("rollout"):
            groups = self.rollout.generate([list(p.prompt_ids) for p in prompts], self._sampling(step))
        self._check_versions(groups)
        # 3. Score every completion in the reward pool.
        with timer("reward"):
            trajectories = self._score(prompts, groups)
        rewards, valid = self._reward_matrix(trajectories, len(prompts))
        batch = build_train_batch(trajectories, self.pad_id)
        if batch.global_num_tokens == 0:
            raise TrainingError(f"step {step}: no trainable tokens (every reward failed?)")
        # 4. Log-probs of the policy before the update (PPO's "old" policy) and of the reference.
        with timer("old_logprobs"):
            batch.old_logprobs = self.trainer.forward_logprobs(batch)
        if self.use_reference:
            with timer("ref_logprobs"):
                batch.ref_logprobs = self.trainer.forward_logprobs(batch, reference=True)
        # 5. Advantages from (KL-penalised, when kl_in_reward) rewards; failed samples take
        #    no part in group statistics.
        shaped, kl_metrics = self._kl_in_reward(rewards, batch)
        advantages = self.advantage_fn(shaped, valid)
        batch.advantages = outcome_advantages_per_token(advantages, batch.loss_mask)
        # 6. Update the policy: trainer.mini_batches optimizer steps per epoch.
        with timer("train"):
            train_metrics = self._update(batch, step)
        # 7. Push the new weights (version = step) to every rollout replica.
        with timer("weight_sync"):
            self.sync_weights(step)
        metrics = {
            **self._rollout_metrics(trajectories, rewards, valid, timer, batch),
            **kl_metrics,
            **train_metrics,
            **timer,
        }
        metrics["timing/step_s"] = time.perf_counter() - t0
        return metrics

    # ------------------------------------------------------------- stages
    def _sampling(self, step: int) -> SamplingParams:
        r = self.cfg.rollout
        # Seeds derive from (seed, step) so a resumed run samples exactly what the
        # uninterrupted run would have.
        return SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, stop=tuple(r.stop),
                              seed=self.cfg.seed * 100_003 + step)

    def _check_versions(self, groups) -> None:
        stale = {c.policy_version for g in groups for c in g} - {self.policy_version}
        if stale:
            raise WorkerError(f"rollouts came from policy versions {sorted(stale)}, expected "
                              f"{self.policy_version}: a replica missed a weight sync")

    def _score(self, prompts: list[PromptSample], groups) -> list[Trajectory]:
        items = [(p.question, c.text, p.answer, p.metadata) for p, g in zip(prompts, groups) for c in g]
        scores = self.rewards.score(items)
        pairs = [(gi, p, c) for gi, (p, g) in enumerate(zip(prompts, groups)) for c in g]
        return [Trajectory(prompt=p, completion=c, reward=r, group_index=gi)
                for (gi, p, c), r in zip(pairs, scores)]

    def _reward_matrix(self, trajectories: list[Trajectory], num_groups: int):
        n = self.cfg.rollout.n
        rewards = torch.tensor([t.reward.total for t in trajectories], dtype=torch.float32).view(num_groups, n)
        valid = torch.tensor([t.reward.error is None for t in trajectories]).view(num_groups, n)
        return rewards, valid

    def _kl_in_reward(self, rewards: torch.Tensor, batch: TrainBatch) -> tuple[torch.Tensor, dict]:
        """``r - beta * sum_t kl_t`` per sample (Ziegler et al. 2019) when
        ``algorithm.kl_in_reward``; the KL is of the sampling policy to the reference."""
        algo = self.cfg.algorithm
        if not algo.kl_in_reward or batch.ref_logprobs is None:
            return rewards, {}
        kl = KL_ESTIMATORS[algo.kl_estimator](batch.old_logprobs, batch.ref_logprobs) * batch.loss_mask
        beta = self.kl_controller.value
        shaped = rewards - beta * kl.sum(dim=1).view_as(rewards)
        seq_kl = mean_sequence_kl(kl, batch.loss_mask)
        self.kl_controller.update(seq_kl, n_steps=batch.size)
        return shaped, {"reward/kl_penalty_coef": beta, "reward/seq_kl_mean": seq_kl}

    def _update(self, batch: TrainBatch, step: int) -> dict:
        tc = self.cfg.trainer
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + step)
        summed: dict[str, float] = {}
        updates = 0
        for _ in range(tc.epochs):
            order = torch.randperm(batch.size, generator=generator) if tc.mini_batches > 1 else torch.arange(batch.size)
            for part in order.chunk(tc.mini_batches):
                mini = batch.select(part).trim()
                mini.global_num_tokens = float(mini.loss_mask.sum())
                mini.global_num_seqs = count_sequences(mini.loss_mask)
                if mini.global_num_tokens == 0:
                    continue
                metrics = self.trainer.train_step(mini, self.loss_fn)
                if metrics.get("skipped", 0.0):
                    self.tracker.message(f"step {step}: non-finite loss or gradient, update skipped")
                for key, value in metrics.items():
                    summed[key] = summed.get(key, 0.0) + value
                updates += 1
        out = {(k if k.startswith("policy/") else f"policy/{k}"): v / max(updates, 1) for k, v in summed.items()}
        out["policy/updates"] = float(updates)
        return out

    def _rollout_metrics(self, trajectories, rewards, valid, timer, batch) -> dict:
        lengths = torch.tensor([len(t.completion.token_ids) for t in trajectories], dtype=torch.float32)
        capped = sum(t.completion.finish_reason == "length" for t in trajectories)
        if capped == len(trajectories) and not self._warned_length_cap:
            self._warned_length_cap = True
            self.tracker.message(
                f"warning: every completion hit rollout.max_new_tokens={self.cfg.rollout.max_new_tokens}; "
                "rewards of truncated answers are likely meaningless. Raise rollout.max_new_tokens.")
        ok = [t.reward for t in trajectories if t.reward.error is None]
        metrics = {
            "reward/mean": rewards[valid].mean().item() if valid.any() else 0.0,
            "reward/std": rewards[valid].std().item() if valid.sum() > 1 else 0.0,
            "reward/errors": float(len(trajectories) - len(ok)),
            "response/length_mean": lengths.mean().item(),
            "response/length_max": lengths.max().item(),
            "response/clip_ratio": capped / len(trajectories),
            "rollout/tokens_per_s": lengths.sum().item() / max(timer.get("timing/rollout_s", 0.0), 1e-9),
            "rollout/policy_version": float(self.policy_version - 1),
        }
        for name in sorted({k for r in ok for k in r.components}):
            values = [r.components.get(name, 0.0) for r in ok]
            metrics[f"reward/{name}_mean"] = sum(values) / len(values)
        # How far the sampler's log-probs are from the trainer's on the same tokens.
        diff = (sampler_logprobs(trajectories, batch.input_ids)[:, : batch.old_logprobs.shape[1]]
                - batch.old_logprobs).abs()[batch.loss_mask.bool()]
        if diff.numel():
            metrics["rollout/logprob_abs_diff_mean"] = diff.mean().item()
            metrics["rollout/logprob_abs_diff_max"] = diff.max().item()
        return metrics

    # ---------------------------------------------------------- weights
    def sync_weights(self, version: int) -> None:
        """Broadcast the trainer's weights to every replica; afterwards all serve ``version``."""
        self.weight_sync.push(version)
        self.policy_version = version

    # ------------------------------------------------------ eval & save
    def evaluate(self) -> dict:
        t0 = time.perf_counter()
        metrics = evaluate(self.rollout, self.rewards, self.val_samples, self.cfg.eval, seed=self.cfg.seed)
        metrics["timing/eval_s"] = time.perf_counter() - t0
        return metrics

    def save(self, step: int) -> None:
        tmp = self.checkpoints.begin(step)
        self.trainer.save(str(tmp / "policy"))
        state = ControllerState(step=step, policy_version=self.policy_version, data=self.stream.state_dict(),
                                kl_controller=self.kl_controller.state_dict())
        path = self.checkpoints.commit(tmp, state)
        self.tracker.message(f"checkpoint: {path}")

    def restore(self, path, state: ControllerState) -> None:
        """Load a checkpoint and bring every replica to its weights."""
        self.trainer.load(str(path / "policy"))
        self.stream.load_state_dict(state.data)
        self.kl_controller.load_state_dict(state.kl_controller)
        self.sync_weights(state.policy_version)
