"""Loss aggregation: a per-token ``[B, T]`` quantity and the loss mask -> a scalar.

Every mode divides by *global* denominators (over every micro-batch and data-parallel
rank of one optimizer step), never by counts of the micro-batch in hand. Each row's
own reduction (its token sum or mean) is local, because a row is never split; so
calling a mode on the pieces of a batch and summing gives exactly the value, and the
gradient, of calling it on the whole batch. This is what lets engines sum gradients
over micro-batches and ranks (``rlpost.engines.base.LossFn``).

Denominators, all floats, all identical on every rank:

- ``global_num_tokens``: masked tokens in the step (``TrainBatch.global_num_tokens``).
- ``global_num_seqs``: rows of the step with at least one masked token
  (``TrainBatch.global_num_seqs``); fully masked rows (failed rewards, filtered
  samples) are not sequences that were trained on, so they do not dilute the mean.
- ``norm_len``: a constant length for Dr.GRPO, the same at every step
  (``algorithm.loss_norm_len``, default ``rollout.max_new_tokens``).

All modes share one signature so a LossFn can call any of them; each checks only
the denominators it uses.
"""

from __future__ import annotations

import torch


def _positive(value: float, name: str, mode: str) -> None:
    if value <= 0:
        raise ValueError(f"loss aggregation {mode!r} needs {name} > 0, got {value}: "
                         "set it for the whole step before splitting the batch")


def token_mean(values: torch.Tensor, mask: torch.Tensor, global_num_tokens: float,
               global_num_seqs: float = 0.0, norm_len: float = 0.0) -> torch.Tensor:
    """Sum over this micro-batch's masked tokens divided by the step's *global* token
    count, so summing over micro-batches and ranks gives the mean over all tokens of
    the step, independent of how the batch was split (the DAPO token-level loss):
    ``sum_i sum_t m_it x_it / sum_i sum_t m_it``."""
    if global_num_tokens <= 0:
        raise ValueError("global_num_tokens must be > 0: the step has no trainable tokens")
    return (values * mask).sum() / global_num_tokens


def seq_mean_token_sum(values: torch.Tensor, mask: torch.Tensor, global_num_tokens: float = 0.0,
                       global_num_seqs: float = 0.0, norm_len: float = 0.0) -> torch.Tensor:
    """``(1 / S) sum_i sum_t m_it x_it``: each sequence's token *sum*, averaged over the
    step's S sequences. Long sequences weigh more (the loss scales with length)."""
    _positive(global_num_seqs, "global_num_seqs", "seq-mean-token-sum")
    return (values * mask).sum() / global_num_seqs


def seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor, global_num_tokens: float = 0.0,
                        global_num_seqs: float = 0.0, norm_len: float = 0.0) -> torch.Tensor:
    """``(1 / S) sum_i (sum_t m_it x_it / |o_i|)``: each sequence's token *mean*,
    averaged over sequences. The original GRPO objective (Shao et al. 2024, eq. 3) and
    GSPO's; every sequence weighs the same whatever its length (the length bias
    Dr.GRPO points out). A fully masked row adds 0."""
    _positive(global_num_seqs, "global_num_seqs", "seq-mean-token-mean")
    per_seq = (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return per_seq.sum() / global_num_seqs


def seq_mean_token_sum_norm(values: torch.Tensor, mask: torch.Tensor, global_num_tokens: float = 0.0,
                            global_num_seqs: float = 0.0, norm_len: float = 0.0) -> torch.Tensor:
    """Dr.GRPO (Liu et al. 2025): ``(1 / S) sum_i sum_t m_it x_it / L`` with ``L`` a
    constant (the maximum response length), replacing GRPO's per-sequence ``1 / |o_i|``
    so that no length bias is introduced; L only rescales, like a learning rate.

    Deviation from verl: verl sums (not averages) over the sequences of a batch, so its
    loss scale grows with the batch size; we average over the step's sequences, which
    is the paper's ``1 / G`` and keeps the scale of ``token-mean``.
    """
    _positive(global_num_seqs, "global_num_seqs", "seq-mean-token-sum-norm")
    _positive(norm_len, "norm_len", "seq-mean-token-sum-norm")
    return (values * mask).sum() / (global_num_seqs * norm_len)


LOSS_AGGREGATIONS = {
    "token-mean": token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}
# Modes that need TrainBatch.global_num_seqs / a constant length.
USES_NUM_SEQS = frozenset({"seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"})
USES_NORM_LEN = frozenset({"seq-mean-token-sum-norm"})


def count_sequences(mask: torch.Tensor) -> float:
    """Rows with at least one masked token: ``global_num_seqs`` when ``mask`` is the
    whole step's (or mini-batch's) loss mask."""
    return float((mask.sum(dim=-1) > 0).sum())
