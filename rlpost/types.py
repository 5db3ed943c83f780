"""Typed data that crosses component boundaries.

Token alignment used everywhere: a sequence is ``prompt_ids + completion_ids``;
per-token tensors have shape ``[B, T]`` aligned with ``input_ids`` so that
``logprobs[b, t] = log p(input_ids[b, t] | input_ids[b, :t])``. Position 0 and pad
positions hold 0 and are never in ``loss_mask``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Imported where tensors are handled, not here: the reward and environment actors
    # use these types without tensors, and importing torch costs each of them about
    # 2 s of CPU at start-up (docs/performance.md, "Start-up on the tiny model").
    import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 disables top-k
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None  # per-request seed; None draws from the engine's generator

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class PromptSample:
    """One dataset row, templated and tokenised once on the driver."""

    uid: str  # stable id (dataset index), used to group samples and to resume
    prompt_ids: tuple[int, ...]  # chat-templated prompt, generation prompt included
    question: str  # the raw user question, what reward functions see as `prompt`
    answer: str  # ground truth
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of one prompt."""

    token_ids: tuple[int, ...]  # [L] sampled tokens; EOS included when it was sampled
    logprobs: tuple[float, ...]  # [L] sampler log-probs of token_ids (after temperature/top-p/top-k)
    text: str  # decoded token_ids, special tokens skipped
    finish_reason: str  # "stop" (EOS or stop string) | "length" (hit max_new_tokens)
    # The OLDEST version of the weights that sampled any token (every token's, unless
    # token_versions says otherwise); staleness bounds apply to it.
    policy_version: int
    # [L] 1 = sampled by the policy (trained), 0 = inserted by an environment or tool
    # (multi-turn episodes; such tokens have logprob 0). None = every token sampled.
    loss_mask: tuple[int, ...] | None = None
    # [L] the policy version that sampled each token, when a weight update landed while
    # the sample was being generated (in-flight updates, rlpost.engines.inflight);
    # inserted tokens (loss_mask 0) carry the version of the sampled token before them.
    # None = every token by policy_version.
    token_versions: tuple[int, ...] | None = None

    def versions(self) -> tuple[int, ...]:
        """[L] the policy version of every token."""
        return self.token_versions if self.token_versions is not None else (self.policy_version,) * len(self.token_ids)


@dataclass(frozen=True)
class Reward:
    """Score of one completion. ``error`` is set when the reward function failed on
    this sample; such samples are excluded from group statistics, not scored 0."""

    total: float
    components: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Trajectory:
    prompt: PromptSample
    completion: Completion
    reward: Reward
    group_index: int  # index of the prompt's group within the step


@dataclass(frozen=True)
class ModelOutput:
    """What a training engine's forward returns, aligned with ``input_ids``."""

    logprobs: torch.Tensor | None  # [B, T] float32; None from a value model (critic)
    entropy: torch.Tensor | None = None  # [B, T] float32, when asked for
    # [B, T] float32 from a value model: values[b, t] = V(input_ids[b, :t]), the value of
    # the state before token t (aligned like logprobs); 0 at position 0 and padding.
    values: torch.Tensor | None = None


@dataclass
class TrainBatch:
    """Padded tensors for one optimizer step (or one shard of it).

    Engines read only ``input_ids``/``attention_mask``; the other fields are for the
    loss function, which the engine passes through without looking at them.
    """

    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    loss_mask: torch.Tensor  # [B, T] float, 1 = completion token that is trained
    advantages: torch.Tensor | None = None  # [B, T] float
    old_logprobs: torch.Tensor | None = None  # [B, T] float, policy that sampled (or pre-update)
    ref_logprobs: torch.Tensor | None = None  # [B, T] float, reference policy
    rollout_logprobs: torch.Tensor | None = None  # [B, T] float, the rollout engine's sampler log-probs
    old_values: torch.Tensor | None = None  # [B, T] float, critic values before the update (PPO)
    returns: torch.Tensor | None = None  # [B, T] float, GAE returns: the critic's regression target
    # Number of trained tokens across the whole step (all micro-batches, all ranks);
    # losses divide by it so that splitting a batch never changes the gradient.
    global_num_tokens: float = 0.0
    # Rows with at least one trained token across the whole step (sequence-mean losses).
    global_num_seqs: float = 0.0

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: slice | torch.Tensor | list[int]) -> "TrainBatch":
        """Rows ``index`` of every tensor field; scalars are kept."""
        import torch

        kwargs = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        return TrainBatch(**kwargs)

    def chunks(self, chunk_size: int) -> list["TrainBatch"]:
        return [self.select(slice(i, i + chunk_size)) for i in range(0, self.size, chunk_size)]

    def shard(self, num_shards: int) -> list["TrainBatch"]:
        """Contiguous, equal shards for data-parallel ranks (size must divide evenly)."""
        if self.size % num_shards:
            raise ValueError(f"batch of {self.size} rows cannot be split over {num_shards} ranks")
        per = self.size // num_shards
        return [self.select(slice(r * per, (r + 1) * per)) for r in range(num_shards)]

    def trim(self) -> "TrainBatch":
        """Drop trailing columns that are padding in every row."""
        import torch

        length = int(self.attention_mask.sum(dim=1).max().item()) if self.size else 0
        kwargs = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = value[:, :length] if isinstance(value, torch.Tensor) else value
        return TrainBatch(**kwargs)
