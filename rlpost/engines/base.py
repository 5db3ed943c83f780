"""Engine interfaces. Engines are algorithm-blind: a training engine runs forward
passes and optimizer steps with whatever loss function it is handed; a rollout
engine samples tokens and swaps weights. Neither knows GRPO from PPO."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import torch

from rlpost.types import Completion, ModelOutput, SamplingParams, TrainBatch

# loss_fn(output, micro_batch) -> (loss, metrics).
# The loss must already be normalised by ``micro_batch.global_num_tokens`` (or by
# whatever global denominator the algorithm uses), so that gradients *sum* across
# micro-batches and data-parallel ranks. Metrics follow the same rule: each value is
# an additive contribution, and the engine and group sum them; a token-mean metric
# therefore divides by the global token count, not the micro-batch's.
LossFn = Callable[[ModelOutput, TrainBatch], tuple[torch.Tensor, dict[str, float]]]


class TrainEngine(Protocol):
    """One data-parallel rank of a policy (or reference) model.

    All methods are collective: every rank of the group calls them together.
    """

    def forward_logprobs(self, batch: TrainBatch, *, with_entropy: bool = False,
                         micro_batch_size: int | None = None) -> ModelOutput:
        """Log-probs of ``batch.input_ids`` under the current weights, no gradient,
        ``micro_batch_size`` rows per forward (None: the engine's default)."""

    def forward_values(self, batch: TrainBatch, *, micro_batch_size: int | None = None) -> ModelOutput:
        """Value models (a PPO critic) only, instead of ``forward_logprobs``:
        ``ModelOutput.values`` [B, T], no gradient. Their forward inside ``train_step``
        hands the loss function ``values`` (with gradient) and ``logprobs=None``."""

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, micro_batch_size: int, *,
                   return_logprobs: bool = False):
        """One optimizer step on this rank's shard, accumulated over micro-batches.

        Returns the loss_fn metrics summed over micro-batches (not yet over ranks),
        plus ``grad_norm``, ``lr`` and ``skipped`` (1.0 when a non-finite loss or
        gradient made the engine skip the update), which are global: identical on
        every rank. With ``return_logprobs=True`` (policy engines), returns
        ``(metrics, logprobs)``: the training forward's log-probs, detached, [B, T]
        float32 on CPU in ``batch``'s row order, so the caller need not run a
        separate forward for them (``rlpost.algorithms.on_policy``).
        """

    def named_weight_shapes(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, full shape, dtype) of every tensor ``named_full_weights`` yields,
        in the same order; local, not collective (plans the weight sync)."""

    def named_full_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (unsharded) tensors in HF naming, one at a time. Collective; only
        rank 0's values are meaningful."""

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...

    def export_hf(self, path: str, tokenizer_path: str | None = None) -> None:
        """Write an HF folder (config, weights, tokenizer from ``tokenizer_path``,
        default the source model folder) that transformers loads."""


class RolloutEngine(Protocol):
    """Samples completions. Holds exactly one policy version at a time."""

    policy_version: int

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Completion]]:
        """``params.n`` completions for every prompt, in prompt order."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the weights in place; afterwards every completion has ``version``."""
