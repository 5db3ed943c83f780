"""Stage 1-3 of a step: draw prompts, sample completions, score them, and shape the
rewards the advantage estimator sees (DAPO overlong penalty, dynamic sampling).

Contract: ``collect(step, policy_version)`` consumes prompts from the stream, waits
for the rollout group and the reward pool, and returns exactly
``data.train_batch_size`` groups of ``rollout.n`` trajectories, every one sampled by
``policy_version`` (anything else raises ``WorkerError``). With
``trainer.inflight_updates`` new weights may land while it samples: every token is
then sampled by ``policy_version`` or a later version (``Completion.token_versions``);
an older one still raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rlpost.algorithms import dynamic_sampling_keep, make_algorithm, overlong_penalty
from rlpost.config.schema import AlgorithmConfig, RolloutConfig, RunConfig
from rlpost.groups import RewardPoolLike, RolloutGroupLike
from rlpost.data.stream import PromptStream
from rlpost.errors import WorkerError
from rlpost.types import PromptSample, SamplingParams, Trajectory


@dataclass
class Collected:
    trajectories: list[Trajectory]  # group-major: G groups of n
    rewards: torch.Tensor  # [G, n] what the advantage estimator sees (shaped)
    valid: torch.Tensor  # [G, n] bool, False where the reward function failed
    metrics: dict[str, float]
    # Extra keyword arguments of the advantage estimator: ReMax's greedy-rollout
    # baseline ``baseline`` [G] and ``baseline_valid`` [G].
    estimator_args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CollectSettings:
    """The parts of the run config that collecting a step reads."""

    rollout: RolloutConfig
    algorithm: AlgorithmConfig  # dynamic sampling, overlong shaping, the Algorithm's extra samples
    train_batch_size: int  # prompts (groups) per step
    seed: int
    inflight: bool = False  # trainer.inflight_updates: later versions may land mid-collect

    @classmethod
    def of(cls, cfg: RunConfig) -> CollectSettings:
        return cls(cfg.rollout, cfg.algorithm, cfg.data.train_batch_size, cfg.seed, cfg.trainer.inflight_updates)


class Collector:
    """Stages 1-3 of a step. ``rollout``/``rewards``: a ``RolloutGroupLike`` and a
    ``RewardPoolLike`` (``rlpost.groups``); ``episodes``: an ``EpisodeCollector`` for
    multi-turn runs (``rlpost.rollout.multiturn.make_episode_collector``) or an
    ``AgentEpisodeCollector`` for ``env.agent`` (``rlpost.rollout.agents``), else None."""

    def __init__(self, cfg: CollectSettings, stream: PromptStream, rollout: RolloutGroupLike,
                 rewards: RewardPoolLike, episodes=None, message: Callable[[str], None] = print):
        self.cfg, self.stream, self.rollout, self.rewards = cfg, stream, rollout, rewards
        self.message = message  # the run's console line (Tracker.message)
        self.algorithm = make_algorithm(cfg.algorithm)  # asked for the extra samples it needs
        self._warned_padding = False
        self.episodes = episodes  # multi-turn episodes through environments; None = single turn

    def sampling_params(self, step: int, round_: int = 0) -> SamplingParams:
        r = self.cfg.rollout
        # Seeds derive from (seed, step, round) only, so a resumed run samples exactly
        # what the uninterrupted run would have.
        seed = self.cfg.seed * 100_003 + step
        if round_:
            seed = seed * 31 + round_
        return SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, stop=tuple(r.stop), seed=seed)

    def collect(self, step: int, policy_version: int, timer) -> Collected:
        """``timer(name)`` is a context manager accumulating ``timing/<name>_s``."""
        algo, want = self.cfg.algorithm, self.cfg.train_batch_size
        rounds = algo.max_sampling_rounds if algo.dynamic_sampling else 1
        kept: list[tuple[list[Trajectory], torch.Tensor, torch.Tensor]] = []
        dropped: list[tuple[list[Trajectory], torch.Tensor, torch.Tensor]] = []
        drawn = 0
        for round_ in range(rounds):
            trajectories, rewards, valid = self._sample_and_score(step, round_, policy_version, timer)
            drawn += rewards.shape[0]
            keep = dynamic_sampling_keep(rewards, valid) if algo.dynamic_sampling else torch.ones(rewards.shape[0], dtype=torch.bool)
            n = self.cfg.rollout.n
            for g in range(rewards.shape[0]):
                group = (trajectories[g * n : (g + 1) * n], rewards[g], valid[g])
                (kept if keep[g] else dropped).append(group)
            if len(kept) >= want:
                break
        # Not enough informative groups within the round limit: fill up with dropped ones
        # (zero advantage, so no gradient) rather than fail the step, and say so.
        chosen = (kept + dropped)[:want]
        if algo.dynamic_sampling and len(kept) < want:
            self._warn_padding(step, len(kept), want, drawn)
        metrics = {"sampling/groups_drawn": float(drawn), "sampling/groups_informative": float(len(kept)),
                   "sampling/groups_filled": float(max(0, want - len(kept)))} if algo.dynamic_sampling else {}
        if self.episodes is not None:
            metrics.update(self.episodes.pop_metrics())
        trajectories = [t for group, _, _ in chosen for t in group]
        rewards = torch.stack([r for _, r, _ in chosen])
        valid = torch.stack([v for _, _, v in chosen])
        args = {}
        if self.algorithm.greedy_baseline:
            args = self._greedy_baseline([group[0].prompt for group, _, _ in chosen], policy_version, timer)
            metrics["reward/greedy_baseline_mean"] = args["baseline"].mean().item()
        return Collected(trajectories, rewards, valid, metrics, args)

    def _warn_padding(self, step: int, informative: int, want: int, drawn: int) -> None:
        if self._warned_padding:
            return
        self._warned_padding = True
        self.message(f"warning: step {step}: dynamic sampling found {informative} informative groups of the "
                     f"{want} wanted in {drawn} drawn (algorithm.max_sampling_rounds="
                     f"{self.cfg.algorithm.max_sampling_rounds}); padded with {want - informative} all-equal groups "
                     "that carry no gradient. Raise algorithm.max_sampling_rounds; later paddings are counted in "
                     "sampling/groups_filled without this message.")

    def _greedy_baseline(self, prompts: list[PromptSample], policy_version: int, timer) -> dict:
        """ReMax: one greedy rollout per prompt, scored like the samples (Li et al. 2023)."""
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=self.cfg.rollout.max_new_tokens,
                                stop=tuple(self.cfg.rollout.stop))
        with timer("rollout"):
            groups = self.rollout.generate([list(p.prompt_ids) for p in prompts], params)
        self._check_versions(groups, policy_version, self.cfg.inflight)
        with timer("reward"):
            scored = self._score(prompts, groups)
        return {"baseline": torch.tensor([t.reward.total for t in scored], dtype=torch.float32),
                "baseline_valid": torch.tensor([t.reward.error is None for t in scored])}

    @staticmethod
    def _check_versions(groups, policy_version: int, inflight: bool) -> None:
        # policy_version is the oldest token's; in flight, later versions are expected.
        stale = {c.policy_version for g in groups for c in g
                 if c.policy_version < policy_version or (c.policy_version != policy_version and not inflight)}
        if stale:
            raise WorkerError(f"rollouts came from policy versions {sorted(stale)}, expected "
                              f"{policy_version}: a replica missed a weight sync")

    def _sample_and_score(self, step: int, round_: int, policy_version: int, timer):
        prompts = self.stream.next_batch()
        if self.episodes is not None:  # environments step and score the episodes
            return self.episodes.collect(prompts, self.sampling_params(step, round_), policy_version, timer)
        with timer("rollout"):
            groups = self.rollout.generate([list(p.prompt_ids) for p in prompts], self.sampling_params(step, round_))
        self._check_versions(groups, policy_version, self.cfg.inflight)
        with timer("reward"):
            trajectories = self._score(prompts, groups)
        n = self.cfg.rollout.n
        rewards = torch.tensor([t.reward.total for t in trajectories], dtype=torch.float32).view(len(prompts), n)
        valid = torch.tensor([t.reward.error is None for t in trajectories]).view(len(prompts), n)
        algo = self.cfg.algorithm
        if algo.overlong_buffer_len > 0:
            lengths = torch.tensor([len(t.completion.token_ids) for t in trajectories])
            penalty = overlong_penalty(lengths, self.cfg.rollout.max_new_tokens, algo.overlong_buffer_len,
                                       algo.overlong_penalty_factor)
            rewards = rewards + penalty.view_as(rewards)
        return trajectories, rewards, valid

    def _score(self, prompts: list[PromptSample], groups) -> list[Trajectory]:
        items = [(p.question, c.text, p.answer, p.metadata) for p, g in zip(prompts, groups) for c in g]
        scores = self.rewards.score(items)
        pairs = [(gi, p, c) for gi, (p, g) in enumerate(zip(prompts, groups)) for c in g]
        return [Trajectory(prompt=p, completion=c, reward=r, group_index=gi)
                for (gi, p, c), r in zip(pairs, scores)]
