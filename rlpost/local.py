"""In-process stand-ins for the four driver-side objects the controller drives:
no Ray, no torch.distributed, no extra processes.

What it is for: tests, notebooks, and debugging the controller (or a new loss,
advantage estimator or reward function) without a cluster, with the shipped fakes
(``rlpost.engines.fake``) or any engine that works without a process group.
Same contract as ``rlpost.workers``, method for method, so the ``Controller`` cannot
tell them apart:

    LocalTrainerGroup   ~ TrainerGroup    forward_logprobs / train_step / save / load / export_hf
    LocalCriticGroup    ~ CriticGroup     forward_values / train_step / save / load
    LocalRolloutGroup   ~ RolloutGroup    size / generate / policy_versions
    LocalRewardPool     ~ RewardPool      score
    LocalWeightSync     ~ WeightSyncLink  push

Differences that are deliberate: one trainer rank (the batch is not sharded, so
``train_step`` metrics are already the group's); rollout replicas run one after the
other instead of in parallel; reward scoring runs in this process (``reward.workers``
is ignored; ``reward.timeout_s`` is still enforced, see ``rlpost.rewards.api``).
Every call blocks until done, like the Ray groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlpost.config.schema import RewardConfig
from rlpost.engines.base import LossFn, RolloutEngine, TrainEngine
from rlpost.errors import ConfigError, WorkerError
from rlpost.rewards.api import load_reward_fn, score_batch
from rlpost.sharding import check_replica, replica_sampling_params, split_contiguous
from rlpost.types import Completion, Reward, SamplingParams, TrainBatch

# (prompt, completion, ground_truth, metadata), the reward function's arguments.
RewardItem = tuple[str, str, str, dict]


class LocalTrainerGroup:
    """One training engine (a single data-parallel rank) and an optional frozen
    reference engine, with ``TrainerGroup``'s methods."""

    def __init__(self, engine: TrainEngine, reference_engine: TrainEngine | None = None, *,
                 micro_batch_size: int):
        if micro_batch_size < 1:
            raise ValueError(f"need micro_batch_size >= 1, got {micro_batch_size}")
        self.engine, self.reference_engine = engine, reference_engine
        self.micro_batch_size = micro_batch_size
        self.world_size = 1

    def forward_logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        """[B, T] log-probs of ``batch`` under the policy (or the reference), computed
        ``micro_batch_size`` rows at a time like a trainer rank does."""
        engine = self.engine
        if reference:
            if self.reference_engine is None:
                raise ConfigError("a KL term needs reference log-probs (algorithm.kl_coef > 0), but this "
                                  "LocalTrainerGroup has no reference model: pass reference_engine=")
            engine = self.reference_engine
        # The TrainEngine protocol's forward_logprobs takes no micro-batch size, so
        # the group chunks here; rows are independent, so the result is the same.
        parts = [engine.forward_logprobs(mb).logprobs for mb in batch.chunks(self.micro_batch_size)]
        return torch.cat(parts, dim=0) if parts else torch.zeros(tuple(batch.input_ids.shape))

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, return_logprobs: bool = False):
        """One optimizer step over the whole ``batch`` (one rank: nothing to merge);
        ``return_logprobs``: ``(metrics, the training forward's detached log-probs)``."""
        if return_logprobs:
            return self.engine.train_step(batch, loss_fn, self.micro_batch_size, return_logprobs=True)
        return self.engine.train_step(batch, loss_fn, self.micro_batch_size)

    def save(self, path: str) -> None:
        self.engine.save(path)

    def load(self, path: str) -> None:
        self.engine.load(path)

    def export_hf(self, path: str, tokenizer_path: str | None = None) -> None:
        # The TrainEngine protocol's export_hf takes only a path; FSDPEngine also takes
        # a tokenizer folder. Pass it on only when given.
        if tokenizer_path is None:
            self.engine.export_hf(path)
        else:
            self.engine.export_hf(path, tokenizer_path)

    def shutdown(self) -> None:
        """Nothing to release; here so train-style code can shut every group down."""


class LocalCriticGroup:
    """One value-model engine (a PPO critic, e.g. ``FSDPEngine(..., head="value")`` or
    ``FakeValueEngine``) on a single rank, with ``CriticGroup``'s methods."""

    def __init__(self, engine: TrainEngine, *, micro_batch_size: int):
        if micro_batch_size < 1:
            raise ValueError(f"need micro_batch_size >= 1, got {micro_batch_size}")
        self.engine, self.micro_batch_size = engine, micro_batch_size

    def forward_values(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] values of ``batch`` (``rlpost.types`` alignment), no gradient."""
        return self.engine.forward_values(batch, micro_batch_size=self.micro_batch_size).values

    def train_step(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]:
        return self.engine.train_step(batch, loss_fn, self.micro_batch_size)

    def save(self, path: str) -> None:
        self.engine.save(path)

    def load(self, path: str) -> None:
        self.engine.load(path)

    def shutdown(self) -> None:
        """Nothing to release."""


class LocalRolloutGroup:
    """Rollout replicas, one engine each. Holds whatever policy version its engines
    serve; only ``LocalWeightSync.push`` changes it."""

    def __init__(self, engines: Sequence[RolloutEngine]):
        if not engines:
            raise ValueError("LocalRolloutGroup needs at least one rollout engine")
        self.engines = list(engines)

    @property
    def size(self) -> int:
        return len(self.engines)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 replica: int | None = None) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order. Prompts are split into
        contiguous chunks, one per replica, each replica sampling with its own seed
        (``rlpost.sharding``), exactly as ``RolloutGroup.generate`` does; ``replica``
        runs them all on that one replica (with its seed)."""
        if replica is not None:
            check_replica(replica, self.size)
            return self.engines[replica].generate(prompts, replica_sampling_params(params, replica))
        parts = split_contiguous(prompts, self.size)
        return [group
                for replica, (engine, part) in enumerate(zip(self.engines, parts))
                for group in engine.generate(part, replica_sampling_params(params, replica))]

    def policy_versions(self) -> list[int]:
        return [engine.policy_version for engine in self.engines]

    def shutdown(self) -> None:
        """Nothing to release."""


class LocalRewardPool:
    """Scores completions in this process with ``reward.fn``."""

    def __init__(self, cfg: RewardConfig):
        # Load now, so a missing function or a signature that does not take
        # reward.kwargs fails at start-up, as RewardPool does.
        self.fn = load_reward_fn(cfg.fn, kwargs=cfg.kwargs)
        self.cfg = cfg

    def score(self, items: list[RewardItem]) -> list[Reward]:
        """One Reward per item, in order. A sample whose reward function raises or
        times out gets ``Reward.error``; it never fails the call."""
        return score_batch(self.fn, items, self.cfg.timeout_s, self.cfg.kwargs)

    def shutdown(self) -> None:
        """Nothing to release."""


class LocalWeightSync:
    """Trainer weights -> every rollout engine, in process.

    ``push(version)`` streams ``trainer_engine.named_full_weights()`` into each
    engine's ``update_weights(..., version)``, one fresh iterator per engine, so at
    most one extra tensor is alive at a time rather than a second copy of the model.
    It returns when every engine serves ``version`` and raises ``WorkerError`` naming
    the replicas that do not (same contract as ``WeightSyncLink.push``).
    """

    def __init__(self, trainer_engine: TrainEngine, rollout_engines: Sequence[RolloutEngine]):
        self.trainer_engine = trainer_engine
        self.rollout_engines = list(rollout_engines)

    def push(self, version: int) -> None:
        for engine in self.rollout_engines:
            engine.update_weights(self.trainer_engine.named_full_weights(), version)
        stale = {i: e.policy_version for i, e in enumerate(self.rollout_engines) if e.policy_version != version}
        if stale:
            raise WorkerError(f"weight sync of version {version}: replicas {sorted(stale)} serve versions "
                              f"{[stale[i] for i in sorted(stale)]} after update_weights; their engine "
                              f"did not take the new weights")
