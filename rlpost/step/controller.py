"""The GRPO controller: wires the components and drives them, one step at a time.

Components never reference the controller, and the controller never touches Ray:
it calls typed methods of the groups it is handed (``rlpost.workers`` on a cluster). Synchronous schedule: rollouts of step
``s`` are sampled by policy version ``s - 1`` (the weights after ``s - 1`` updates);
after the update the trainer pushes version ``s`` to every replica before step
``s + 1`` samples again, so every trained token is exactly on-policy.
``trainer.mode=one_step_off|async`` overlap sampling with training instead
(``rlpost.rollout.overlap``, which drives ``Collector.collect`` and ``train_on`` from two threads).
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext

import torch

from rlpost.algorithms import (
    KL_ESTIMATORS,
    make_algorithm,
    make_kl_controller,
    make_policy_loss_fn,
    mean_sequence_kl,
    overlong_filter_mask,
)
from rlpost.algorithms.algorithm import AdvantageInputs
from rlpost.algorithms.off_policy import correction_of, off_policy_metrics
from rlpost.algorithms.on_policy import old_logprob_plan
from rlpost.step.batching import build_train_batch, mini_batches, with_loss_rows
from rlpost.rollout.collect import Collected, CollectSettings, Collector
from rlpost.rollout.agents import AgentEpisodeCollector, make_agent_collector
from rlpost.rollout.multiturn import EpisodeCollector, make_episode_collector
from rlpost.checkpoint import RNG_FILE, CheckpointManager, ControllerState
from rlpost.config.schema import RunConfig
from rlpost.step.critic import CriticStages
from rlpost.data.stream import PromptStream
from rlpost.errors import ConfigError, Preempted, TrainingError
from rlpost.groups import (AgentPoolLike, CriticGroupLike, EnvPoolLike, RewardPoolLike, RolloutGroupLike, TrainerGroupLike,
                           WeightSyncLike)
from rlpost.rollout.evaluation import evaluate
from rlpost.rollout.overlap import OverlappedRun
from rlpost.tracking import Tracker, trajectory_rows
from rlpost.types import PromptSample, TrainBatch
from rlpost.step.timing import Timer
from rlpost.utils import rng

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, cfg: RunConfig, *, trainer: TrainerGroupLike, rollout: RolloutGroupLike,
                 rewards: RewardPoolLike, weight_sync: WeightSyncLike, stream: PromptStream,
                 val_samples: list[PromptSample], tracker: Tracker, checkpoints: CheckpointManager,
                 pad_id: int, use_reference: bool, envs: EnvPoolLike | None = None,
                 critic: CriticGroupLike | None = None, faults=None, perf=None,
                 agents: AgentPoolLike | None = None):
        self.cfg, self.trainer, self.rollout, self.rewards = cfg, trainer, rollout, rewards
        self.weight_sync = weight_sync
        self.stream, self.val_samples, self.tracker, self.checkpoints = stream, val_samples, tracker, checkpoints
        # envs: multi-turn env pool; messages go to the console line through the tracker
        # agents: env.agent's pool (None: in process); their episodes go through the gateway
        episodes: EpisodeCollector | AgentEpisodeCollector | None = None
        if cfg.env.agent is not None:
            episodes = make_agent_collector(cfg, rollout, rewards, agents)
        elif cfg.env.enabled(cfg.rollout):
            episodes = make_episode_collector(cfg, rollout, envs)
        self.collector = Collector(CollectSettings.of(cfg), stream, rollout, rewards, episodes,
                                   message=lambda text: self.tracker.message(text))
        self.pad_id, self.use_reference = pad_id, use_reference
        self.faults = faults  # rlpost.faults.FaultCounts: failures survived, logged every step
        self.perf = perf  # rlpost.perf.StepPerf: perf/mfu and tokens/s every step (None: not reported)
        # What the algorithm needs from a step, and its advantages (rlpost.algorithms.algorithm).
        self.algorithm = make_algorithm(cfg.algorithm)
        self.loss_fn = make_policy_loss_fn(cfg.algorithm, max_response_len=cfg.rollout.max_new_tokens)
        self.off_policy = correction_of(cfg.algorithm)  # algorithm.off_policy (or tis_cap)
        # Exactly on-policy updates take "old" log-probs from the training forward instead
        # of a separate pass (rlpost.algorithms.on_policy); decided once, here.
        self.old_logprobs = old_logprob_plan(cfg.algorithm, cfg.trainer)
        if self.algorithm.needs_critic != (critic is not None):
            raise ConfigError(f"{self.algorithm.describe()}: needs_critic={self.algorithm.needs_critic} (PPO needs "
                              f"a critic group, the others take none), got critic={critic!r}")
        # PPO's values come from the critic (rlpost.step.critic), which it also trains.
        self.critic = CriticStages.of(cfg, critic) if critic is not None else None
        self.kl_controller = make_kl_controller(cfg.algorithm.kl_coef, cfg.algorithm.kl_target,
                                                cfg.algorithm.kl_horizon)
        self.policy_version = 0
        self.bad_updates = 0  # consecutive skipped (non-finite) updates
        self._warned_length_cap = False
        # one_step_off / async: the producer/trainer loops (None = the synchronous run below).
        # Their weight pushes wait for the replicas lock, so weights change between
        # collect calls only: the link is wrapped here, once, by its owner.
        self.overlap = None
        if cfg.trainer.mode != "sync":
            self.overlap = OverlappedRun(cfg.trainer, self, self.collector)
            self.weight_sync = self.overlap.push_between_requests(weight_sync)

    # ------------------------------------------------------------------ loop
    def run(self, start_step: int = 0, stop_requested=lambda: False) -> dict:
        """Train from ``start_step`` to ``trainer.total_steps``; returns the last metrics.

        ``stop_requested()`` is polled after every step (a SIGTERM handler sets it): the
        step in flight finishes, a checkpoint is written and ``Preempted`` is raised.
        """
        cfg = self.cfg
        self.tracker.message(f"rlpost: {self.algorithm.describe()}; {self.old_logprobs.describe()}")
        self.tracker.start(start_step)
        if self.overlap is not None and not self.off_policy.enabled:
            self.tracker.message(f"note: trainer.mode={cfg.trainer.mode} trains on samples up to "
                                 f"{self.overlap.max_staleness} policy version(s) old without off-policy correction; "
                                 "algorithm.off_policy.correction=token_tis (or token_mask, seq_tis, seq_mask) "
                                 "reweights them (docs/algorithms.md#off-policy-corrections)")
        if start_step == 0 and cfg.eval.every > 0:
            self.tracker.log(0, self.evaluate())
        if self.overlap is not None:
            return self.overlap.run(start_step, stop_requested)
        last: dict = {}
        for step in range(start_step + 1, cfg.trainer.total_steps + 1):
            last = self.step(step)
            self.finish_step(step, last, stop_requested)
        return last

    def finish_step(self, step: int, metrics: dict, stop_requested,
                    replicas_lock: AbstractContextManager | None = None) -> None:
        """The tail of every step, in either mode: eval when due, log, checkpoint when
        due or stopping, then ``Preempted`` when stopping. ``replicas_lock`` (overlap
        modes) is held around eval and save, pausing the producer between batches."""
        cfg, guard = self.cfg, replicas_lock or nullcontext()
        final = step == cfg.trainer.total_steps
        if cfg.eval.every > 0 and (step % cfg.eval.every == 0 or final):
            with guard:
                metrics.update(self.evaluate())
        self.tracker.log(step, metrics)
        periodic = cfg.trainer.save_every and step % cfg.trainer.save_every == 0
        stopping = not final and stop_requested()
        if final or periodic or stopping:
            with guard:
                self.save(step)
        if stopping:
            raise Preempted(step)

    def step(self, step: int) -> dict:
        """One GRPO step; returns its metrics."""
        timer, t0 = Timer(), time.perf_counter()
        # 1-3. Draw prompts, sample rollout.n completions each with policy version
        #      step - 1, score them (DAPO: shape rewards, resample uninformative groups).
        collected = self.collector.collect(step, self.policy_version, timer)
        return self.train_on(step, collected, timer, t0)

    def train_on(self, step: int, collected: Collected, timer: Timer, t0: float) -> dict:
        """Stages 4-7 of step ``step`` on ``collected``; returns the step's metrics
        (``timing/step_s`` counted from ``t0``). The samples may come from an older policy
        version (``rlpost.rollout.overlap``). The trainer's pre-update log-probs come from a
        separate pass only where ``self.old_logprobs`` says a value is needed before the
        update; with one mini-batch and one epoch the training forward gives them."""
        trajectories, rewards, valid = collected.trajectories, collected.rewards, collected.valid
        self.tracker.log_samples(step, trajectory_rows(trajectories, limit=4))
        batch = build_train_batch(trajectories, self.pad_id)
        if self.cfg.algorithm.overlong_filter:
            # DAPO overlong filtering: truncated samples keep their place in the group
            # statistics but are not trained on.
            batch = with_loss_rows(batch, overlong_filter_mask([t.completion.finish_reason for t in trajectories]))
        if batch.global_num_tokens == 0:
            raise TrainingError(f"step {step}: no trainable tokens (every reward failed?)")
        # 4. Log-probs of the policy before the update (PPO's "old" policy; on-policy
        #    updates reuse the training forward's instead) and of the reference.
        with timer("old_logprobs"):  # 0 s when reused: the key stays for dashboards
            if self.old_logprobs.separate_pass:
                batch.old_logprobs = self.trainer.forward_logprobs(batch)
        if self.use_reference:
            with timer("ref_logprobs"):
                batch.ref_logprobs = self.trainer.forward_logprobs(batch, reference=True)
        # 5. The algorithm's advantages from (KL-penalised, when kl_in_reward) rewards;
        #    failed samples take no part in group statistics. PPO's need the critic's values.
        kl_coef = self.kl_controller.value  # this step's KL-penalty coefficient, before its update
        shaped, kl_metrics = self._kl_in_reward(rewards, batch)
        if self.critic is not None:  # the algorithm needs one (checked at start): its forward, then GAE
            with timer("values"):
                kl_metrics.update(self.critic.advantages(batch, rewards, kl_coef))
        else:
            inputs = AdvantageInputs(scores=rewards, kl_coef=kl_coef, rewards=shaped, valid=valid,
                                     estimator_args=collected.estimator_args)
            batch.advantages = self.algorithm.advantages(batch, inputs).advantages
        # 6. Update the critic (PPO), then the policy (frozen during critic.warmup_steps):
        #    trainer.mini_batches optimizer steps per epoch each.
        critic_metrics = {}
        if self.critic:
            with timer("critic"):
                critic_metrics = self.critic.update(batch, step)
        with timer("train"):
            frozen = self.critic is not None and self.critic.policy_frozen(step)
            train_metrics, trainer_logprobs = (({"policy/updates": 0.0}, batch.old_logprobs) if frozen
                                               else self._update(batch, step))
        # 7. Push the new weights (version = step) to every rollout replica.
        with timer("weight_sync"):
            self.sync_weights(step)
        metrics = {
            **self._rollout_metrics(trajectories, valid, timer, batch, trainer_logprobs),
            "perf/old_logprob_pass": float(self.old_logprobs.separate_pass),
            **collected.metrics,
            **kl_metrics,
            **self._off_policy_metrics(batch, trainer_logprobs),
            **train_metrics,
            **critic_metrics,
            **timer,
        }
        if self.faults is not None:
            metrics.update(self.faults.metrics())
        metrics["timing/step_s"] = time.perf_counter() - t0
        if self.perf is not None:
            metrics.update(self._perf_metrics(batch, trajectories, metrics["timing/step_s"]))
        return metrics

    def _perf_metrics(self, batch: TrainBatch, trajectories, step_s: float) -> dict:
        """``perf/*`` of the step: its model FLOPs (rlpost.perf) over its wall time."""
        tokens = float(batch.attention_mask.sum())  # real tokens of every row, prompt included
        passes = int(self.old_logprobs.separate_pass) + int(self.use_reference) + int(self.critic is not None)
        # The value model (PPO) is as big as the policy and trains for as many epochs.
        epochs = self.cfg.trainer.epochs * (2 if self.critic is not None else 1)
        return self.perf.metrics(trained_tokens=tokens * epochs,
                                 generated_tokens=float(sum(len(t.completion.token_ids) for t in trajectories)),
                                 extra_forward_tokens=tokens * passes, step_s=step_s)

    # ------------------------------------------------------------- stages
    def _bad_update(self, step: int) -> None:
        """A non-finite loss or gradient: the engine skipped the update. Too many in a
        row means the run has diverged; stop instead of burning compute."""
        self.bad_updates += 1
        limit = self.cfg.trainer.max_bad_steps
        self.tracker.message(f"step {step}: non-finite loss or gradient, update skipped "
                             f"({self.bad_updates} of at most {limit} in a row)")
        if self.bad_updates > limit:
            raise TrainingError(f"{self.bad_updates} updates in a row had a non-finite loss or gradient "
                                f"(trainer.max_bad_steps={limit}); the run has diverged: lower trainer.lr, "
                                f"check the reward, or resume from an earlier checkpoint")

    def _kl_in_reward(self, rewards: torch.Tensor, batch: TrainBatch) -> tuple[torch.Tensor, dict]:
        """``r - beta * sum_t kl_t`` per sample (Ziegler et al. 2019) when
        ``algorithm.kl_in_reward``; the KL is of the sampling policy to the reference."""
        algo = self.cfg.algorithm
        if not algo.kl_in_reward or batch.ref_logprobs is None:
            return rewards, {}
        if batch.old_logprobs is None:
            raise ValueError("algorithm.kl_in_reward needs the sampling policy's old log-probs")
        kl = KL_ESTIMATORS[algo.kl_estimator](batch.old_logprobs, batch.ref_logprobs) * batch.loss_mask
        beta = self.kl_controller.value
        shaped = rewards - beta * kl.sum(dim=1).view_as(rewards)
        seq_kl = mean_sequence_kl(kl, batch.loss_mask)
        self.kl_controller.update(seq_kl, n_steps=batch.size)
        return shaped, {"reward/kl_penalty_coef": beta, "reward/seq_kl_mean": seq_kl}

    def _update(self, batch: TrainBatch, step: int) -> tuple[dict, torch.Tensor | None]:
        """Policy metrics and the trainer's log-probs of ``batch`` before the update
        ([B, T]): the separate pass's, or, on-policy, the training forward's."""
        tc = self.cfg.trainer
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + step)
        summed: dict[str, float] = {}
        updates = 0
        logprobs = batch.old_logprobs
        for mini in mini_batches(batch, tc.mini_batches, tc.epochs, generator):
            if batch.old_logprobs is None:  # on-policy: one mini-batch, rows in order, trimmed
                metrics, trained = self.trainer.train_step(mini, self.loss_fn, return_logprobs=True)
                logprobs = torch.zeros(tuple(batch.input_ids.shape))
                logprobs[:, :trained.shape[1]] = trained
            else:
                metrics = self.trainer.train_step(mini, self.loss_fn)
            if metrics["skipped"]:
                self._bad_update(step)
            else:
                self.bad_updates = 0
            for key, value in metrics.items():
                summed[key] = summed.get(key, 0.0) + value
            updates += 1
        out = {(k if k.startswith("policy/") else f"policy/{k}"): v / max(updates, 1) for k, v in summed.items()}
        out["policy/updates"] = float(updates)
        return out, logprobs

    def _off_policy_metrics(self, batch: TrainBatch, trainer_logprobs: torch.Tensor | None) -> dict:
        """The behaviour-ratio distribution the loss corrected (``off_policy/*``), over the
        whole batch: the loss sees micro-batches, whose maxima do not add up.
        ``trainer_logprobs``: the trainer's before the update (the pass's, or the
        training forward's when it was skipped)."""
        if not self.off_policy.enabled or trainer_logprobs is None or batch.rollout_logprobs is None:
            return {}
        return off_policy_metrics(self.off_policy, trainer_logprobs, batch.rollout_logprobs, batch.loss_mask)

    def _rollout_metrics(self, trajectories, valid, timer, batch, trainer_logprobs) -> dict:
        lengths = torch.tensor([len(t.completion.token_ids) for t in trajectories], dtype=torch.float32)
        capped = sum(t.completion.finish_reason == "length" for t in trajectories)
        if capped == len(trajectories) and not self._warned_length_cap:
            self._warned_length_cap = True
            self.tracker.message(
                f"warning: every completion hit rollout.max_new_tokens={self.cfg.rollout.max_new_tokens}; "
                "rewards of truncated answers are likely meaningless. Raise rollout.max_new_tokens.")
        ok = [t.reward for t in trajectories if t.reward.error is None]
        task = torch.tensor([r.total for r in ok], dtype=torch.float32)  # before any shaping
        metrics = {
            "reward/mean": task.mean().item() if len(ok) else 0.0,
            "reward/std": task.std().item() if len(ok) > 1 else 0.0,
            "reward/errors": float(len(trajectories) - len(ok)),
            "response/length_mean": lengths.mean().item(),
            "response/length_max": lengths.max().item(),
            "response/clip_ratio": capped / len(trajectories),
            "rollout/tokens_per_s": lengths.sum().item() / max(timer.get("timing/rollout_s", 0.0), 1e-9),
            "rollout/policy_version": float(min(t.completion.policy_version for t in trajectories)),
        }
        for name in sorted({k for r in ok for k in r.components}):
            values = [r.components.get(name, 0.0) for r in ok]
            metrics[f"reward/{name}_mean"] = sum(values) / len(values)
        # How far the sampler's log-probs are from the trainer's on the same tokens
        # (the trainer's before the update; None when the policy was frozen).
        diff = torch.zeros(0) if trainer_logprobs is None else \
            (batch.rollout_logprobs - trainer_logprobs).abs()[batch.loss_mask.bool()]
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
        episodes, ev = self.collector.episodes, self.cfg.eval
        metrics = (episodes.evaluate(self.val_samples, ev, self.policy_version, seed=self.cfg.seed) if episodes
                   else evaluate(self.rollout, self.rewards, self.val_samples, ev, seed=self.cfg.seed))
        metrics["timing/eval_s"] = time.perf_counter() - t0
        return metrics

    def save(self, step: int) -> None:
        tmp = self.checkpoints.begin(step)
        self.trainer.save(str(tmp / "policy"))
        if self.critic:
            self.critic.save(str(tmp / "critic"))
        rng.save(tmp / RNG_FILE)
        state = ControllerState(step=step, policy_version=self.policy_version, data=self.stream.state_dict(),
                                kl_controller=self.kl_controller.state_dict(),
                                overlap=self.overlap.save(tmp) if self.overlap else {}, guards=self._guards())
        path = self.checkpoints.commit(tmp, state)
        self.tracker.message(f"checkpoint: {path}")

    def _guards(self) -> dict:
        """Counters that span steps: without them a resumed run would forgive bad
        updates seen just before the checkpoint and repeat the length-cap warning."""
        guards = {"bad_updates": self.bad_updates, "warned_length_cap": self._warned_length_cap}
        if self.critic:
            guards["critic_bad_updates"] = self.critic.bad_updates
        return guards

    def _restore_guards(self, guards: dict) -> None:
        self.bad_updates = guards.get("bad_updates", 0)
        self._warned_length_cap = guards.get("warned_length_cap", False)
        if self.critic:
            self.critic.bad_updates = guards.get("critic_bad_updates", 0)

    def restore(self, path, state: ControllerState) -> None:
        """Load a checkpoint and bring every replica to its weights."""
        self.trainer.load(str(path / "policy"))
        if self.critic:
            self.critic.load(str(path / "critic"))
        self.stream.load_state_dict(state.data)
        self.kl_controller.load_state_dict(state.kl_controller)
        self._restore_guards(state.guards)
        rng.load(path / RNG_FILE)
        if self.overlap:  # the batches sampled ahead of the trainer, trained first
            self.overlap.restore(path, state)
        elif state.overlap.get("buffered"):
            self.tracker.message(f"warning: {path} holds {state.overlap['buffered']} batches sampled ahead "
                                 "(trainer.mode=async/one_step_off); trainer.mode=sync drops them")
        self.sync_weights(state.policy_version)
