"""Trajectories -> padded TrainBatch (token alignment as in rlpost.types)."""

from __future__ import annotations

import torch

from rlpost.algorithms import count_sequences
from rlpost.types import TrainBatch, Trajectory


def build_train_batch(trajectories: list[Trajectory], pad_id: int) -> TrainBatch:
    """Right-padded ``[B, T]`` tensors. ``loss_mask`` covers the completion tokens
    (only the sampled ones where ``Completion.loss_mask`` marks environment tokens);
    trajectories whose reward failed get an all-zero loss mask. Advantages are set
    later by the run's ``Algorithm.advantages`` (``rlpost.algorithms.algorithm``), once the
    KL terms they may need exist."""
    lengths = [len(t.prompt.prompt_ids) + len(t.completion.token_ids) for t in trajectories]
    rows, width = len(trajectories), max(lengths)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    loss_mask = torch.zeros((rows, width), dtype=torch.float32)
    for i, traj in enumerate(trajectories):
        p, c = len(traj.prompt.prompt_ids), len(traj.completion.token_ids)
        input_ids[i, : p + c] = torch.tensor(traj.prompt.prompt_ids + traj.completion.token_ids)
        attention[i, : p + c] = 1
        if traj.reward.error is None:
            mask = traj.completion.loss_mask
            loss_mask[i, p : p + c] = 1.0 if mask is None else torch.tensor(mask, dtype=torch.float32)
    return TrainBatch(input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask,
                      rollout_logprobs=sampler_logprobs(trajectories, input_ids),
                      global_num_tokens=float(loss_mask.sum()),
                      global_num_seqs=count_sequences(loss_mask))


def sampler_logprobs(trajectories: list[Trajectory], like: torch.Tensor) -> torch.Tensor:
    """The rollout engine's logprobs laid out like the batch (0 outside completions)."""
    out = torch.zeros_like(like, dtype=torch.float32)
    for i, traj in enumerate(trajectories):
        p, c = len(traj.prompt.prompt_ids), len(traj.completion.token_ids)
        out[i, p : p + c] = torch.tensor(traj.completion.logprobs, dtype=torch.float32)
    return out


def with_loss_rows(batch: TrainBatch, keep_rows: torch.Tensor) -> TrainBatch:
    """``batch`` with the loss mask of rows where ``keep_rows`` ([B] bool) is False
    zeroed, and the global token/sequence counts recomputed."""
    batch.loss_mask = batch.loss_mask * keep_rows.to(batch.loss_mask.dtype).unsqueeze(1)
    batch.global_num_tokens = float(batch.loss_mask.sum())
    batch.global_num_seqs = count_sequences(batch.loss_mask)
    return batch


def mini_batches(batch: TrainBatch, mini_batches: int, epochs: int, generator: torch.Generator):
    """``epochs`` passes of ``mini_batches`` mini-batches over ``batch`` (shuffled when
    there are several), trimmed, each with its own global token/sequence counts (one
    optimizer step each); mini-batches without a trained token are skipped."""
    for _ in range(epochs):
        order = torch.randperm(batch.size, generator=generator) if mini_batches > 1 else torch.arange(batch.size)
        for part in order.chunk(mini_batches):
            mini = batch.select(part).trim()
            mini.global_num_tokens = float(mini.loss_mask.sum())
            mini.global_num_seqs = count_sequences(mini.loss_mask)
            if mini.global_num_tokens > 0:
                yield mini
