"""The driver-side seams: what the controller calls on each group, as typing Protocols.

Two families implement them: the Ray groups in ``rlpost.workers`` (one actor per rank,
replica or worker) and the in-process ones in ``rlpost.local`` / ``rlpost.envs.runner``
(tests, notebooks, debugging). The controller, the collector and evaluation are typed
against these Protocols only, so either family plugs in; the type checker
(mypy, run by tests/unit/test_types.py) and tests/unit/test_group_protocols.py hold both
families to them. Ray stays out of this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from rlpost.engines.base import LossFn
    from rlpost.envs.agent import AgentResult
    from rlpost.envs.base import EnvFailure, StepResult, Task
    from rlpost.envs.runner import Opening
    from rlpost.types import Completion, Reward, SamplingParams, TrainBatch

# (prompt, completion, ground_truth, metadata): the reward function's arguments.
RewardItem = tuple[str, str, str, dict[str, Any]]


@runtime_checkable
class TrainerGroupLike(Protocol):
    """The policy (and the frozen reference, when KL is on) over the trainer's ranks."""

    def forward_logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        """[B, T] log-probs of ``batch`` under the policy (or the reference), no gradient."""
        ...

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, return_logprobs: bool = False) -> Any:
        """One optimizer step over ``batch``: the metrics dict, or ``(metrics, [B, T]
        detached log-probs of the training forward)`` with ``return_logprobs``."""
        ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...

    def export_hf(self, path: str, tokenizer_path: str) -> None: ...

    def shutdown(self) -> None: ...


@runtime_checkable
class CriticGroupLike(Protocol):
    """PPO's value model."""

    def forward_values(self, batch: TrainBatch) -> torch.Tensor: ...

    def train_step(self, batch: TrainBatch, loss_fn: LossFn) -> dict[str, float]: ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...

    def shutdown(self) -> None: ...


@runtime_checkable
class RolloutGroupLike(Protocol):
    """Rollout replicas, each serving one policy version at a time."""

    @property
    def size(self) -> int: ...

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 replica: int | None = None) -> list[list[Completion]]:
        """``params.n`` completions per prompt, in prompt order. ``replica=None`` spreads the
        prompts over every replica; an index runs them all on that replica (the gateway
        keeps a session on one replica so its prefix cache stays warm)."""
        ...

    def policy_versions(self) -> list[int]: ...

    def shutdown(self) -> None: ...


@runtime_checkable
class RewardPoolLike(Protocol):
    def score(self, items: list[RewardItem]) -> list[Reward]:
        """One Reward per item, in order; a failing reward function sets ``Reward.error``."""
        ...

    def shutdown(self) -> None: ...


@runtime_checkable
class EnvPoolLike(Protocol):
    """Multi-turn environments, one live instance per episode id."""

    def reset(self, items: list[tuple[str, Task]]) -> list[Opening | EnvFailure]: ...

    def step(self, items: list[tuple[str, str]]) -> list[StepResult | EnvFailure]: ...

    def close(self, episode_ids: list[str]) -> None: ...

    def shutdown(self) -> None: ...


@runtime_checkable
class AgentPoolLike(Protocol):
    """User agents (``env.agent``), each run against its own gateway session."""

    def run(self, items: list[tuple[str, str, dict[str, Any]]]) -> list[AgentResult | EnvFailure]:
        """``items``: (episode id, session base URL, task row); one result per item, in order."""
        ...

    def shutdown(self) -> None: ...


@runtime_checkable
class WeightSyncLike(Protocol):
    def push(self, version: int) -> None:
        """Returns when every replica serves ``version``; raises WorkerError otherwise."""
        ...
