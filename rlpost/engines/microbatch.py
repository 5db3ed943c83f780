"""How a training engine splits its shard into micro-batches and runs one forward.

Shared by the FSDP2 and DeepSpeed engines; torch only, no Ray, algorithm-blind.

Two ways to split (``plan_micro_batches``):
  fixed         ``micro_batch_size`` rows per micro-batch, in order;
  token budget  ``max_tokens > 0``: rows sorted longest first and filled greedily
                while the micro-batch's compute cost stays within the budget (a row
                longer than the budget goes alone). Cost is rows x longest row when
                padded, the sum of lengths when packed.
With ``share_prompt`` the rows are first sorted by their tokens, so that the
completions of one prompt sit next to each other and land in the same micro-batch,
where ``rlpost.engines.prefix`` runs their prompt once (the token budget then fills
in that order instead of longest first).
Either way the loss is normalised by the step's global token count (LossFn contract
in ``rlpost.engines.base``), so the split changes float rounding only, not the result.

Every micro-batch is trimmed to its longest row, and with ``packing`` its rows run as
one packed row (``rlpost.engines.packing``), so no compute is spent on padding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlpost.engines import packing, prefix
from rlpost.engines.logprobs import sequence_logprobs
from rlpost.types import ModelOutput, TrainBatch


@dataclass(frozen=True)
class ForwardOptions:
    """How the engine runs its model; from ``trainer.*`` (defaults for a reference)."""

    logit_temperature: float = 1.0
    packing: bool = False
    logprob_chunk_tokens: int = 0  # 0: log-softmax over all tokens at once
    share_prompt: bool = False  # rows with a common prefix run it once (rlpost.engines.prefix)


@dataclass
class MicroBatch:
    rows: list[int]  # indices into the shard, in the order ``batch`` holds them
    batch: TrainBatch  # those rows, trimmed to their longest


def plan_micro_batches(lengths: list[int], micro_batch_size: int, max_tokens: int = 0,
                       packed: bool = False, order: list[int] | None = None) -> list[list[int]]:
    """Row indices of each micro-batch (see module docstring); every row exactly once.
    ``order``: the row order to fill in (default: in order for fixed size, longest
    first for a token budget)."""
    if max_tokens <= 0:
        rows = order if order is not None else list(range(len(lengths)))
        return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    if order is None:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        candidate = current + [i]
        cost = sum(lengths[j] for j in candidate) if packed else len(candidate) * max(lengths[j] for j in candidate)
        if current and cost > max_tokens:
            groups.append(current)
            candidate = [i]
        current = candidate
    if current:
        groups.append(current)
    return groups


def token_order(batch: TrainBatch) -> list[int]:
    """Row indices sorted by the rows' real tokens: rows of one prompt end up adjacent."""
    lengths = [int(n) for n in batch.attention_mask.sum(dim=1).tolist()]
    rows = [ids[:n] for ids, n in zip(batch.input_ids.tolist(), lengths)]
    return sorted(range(len(rows)), key=lambda i: rows[i])


def split(batch: TrainBatch, micro_batch_size: int, max_tokens: int, packed: bool,
          share_prompt: bool = False) -> list[MicroBatch]:
    lengths = [int(n) for n in batch.attention_mask.sum(dim=1).tolist()]
    order = token_order(batch) if share_prompt else None
    return [MicroBatch(rows, batch.select(rows).trim())
            for rows in plan_micro_batches(lengths, micro_batch_size, max_tokens, packed, order)]


def pad_count(micro_batches: list, device: torch.device) -> list:
    """``micro_batches`` padded with ``None`` up to the largest count on any rank:
    sharded engines gather parameters per forward and reduce gradients per backward,
    so every rank must run equally many (a ``None`` is a dummy forward)."""
    count = len(micro_batches)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([count], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        count = int(t.item())
    return micro_batches + [None] * (count - len(micro_batches))


def dummy_batch(device: torch.device) -> TrainBatch:
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    return TrainBatch(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=torch.zeros(1, 2, device=device))


def to_device(batch: TrainBatch, device: torch.device) -> TrainBatch:
    moved = {f.name: getattr(batch, f.name).to(device, non_blocking=True)
             for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, **moved)


def forward(model: torch.nn.Module, mb: TrainBatch, opts: ForwardOptions, with_entropy: bool) -> ModelOutput:
    """Log-probs (and entropy) of ``mb`` under ``model``, ``[b, t]`` like ``mb``."""
    if opts.share_prompt:
        return prefix.forward(model, mb.input_ids, mb.attention_mask, opts.logit_temperature, with_entropy,
                              opts.logprob_chunk_tokens)
    if opts.packing:
        rows = packing.pack(mb.input_ids, mb.attention_mask)
        # attention_mask=None is what makes transformers read the position-id resets
        # as sample boundaries (see rlpost.engines.packing).
        logits = model(input_ids=rows.input_ids, position_ids=rows.position_ids, attention_mask=None,
                       use_cache=False).logits
        if opts.logit_temperature != 1.0:
            logits = logits / opts.logit_temperature
        out = sequence_logprobs(logits, rows.input_ids, packing.packed_logprob_mask(rows), with_entropy,
                                opts.logprob_chunk_tokens)
        return ModelOutput(packing.unpack(out.logprobs, rows),
                           packing.unpack(out.entropy, rows) if with_entropy else None)
    mask = mb.attention_mask
    # Right padding: real tokens sit at 0..len-1; pads get clamped positions.
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=mb.input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    if opts.logit_temperature != 1.0:
        # Score tokens under the tempered distribution the sampler drew them from.
        logits = logits / opts.logit_temperature
    return sequence_logprobs(logits, mb.input_ids, mask, with_entropy, opts.logprob_chunk_tokens)


def scatter_rows(parts: list[tuple[list[int], torch.Tensor]], shape: tuple[int, int]) -> torch.Tensor:
    """[B, T] float32 from per-micro-batch ``(rows, [b, t <= T])`` pieces."""
    out = torch.zeros(shape, dtype=torch.float32)
    for rows, values in parts:
        out[rows, :values.shape[1]] = values.float().cpu()
    return out
