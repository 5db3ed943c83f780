"""Sequence packing: the rows of a right-padded ``[B, T]`` batch concatenated into
one ``[1, L]`` row (``L`` = the number of real tokens), so no compute goes to padding.

Position ids restart at 0 for every sample. With ``attention_mask=None`` and such
position ids, transformers (``masking_utils.find_packed_sequence_indices``, 4.5x and
5.x) builds a block-diagonal causal mask for sdpa/eager, and flash-attention uses the
same resets as varlen boundaries, so no token attends across samples. The log-prob
of a sample's first token would read the previous sample's last logits; it is
position 0 of its row, which the token-alignment contract (``rlpost.types``) fixes at
0, so ``packed_logprob_mask`` zeroes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedRows:
    """``input_ids``/``position_ids``: [1, L]; ``lengths``: real tokens per original
    row (B entries, zeros allowed); ``width``: the original T."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    lengths: list[int]
    width: int


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRows:
    """Concatenate the real tokens of each right-padded row (``attention_mask`` 1)."""
    lengths = [int(n) for n in attention_mask.sum(dim=1).tolist()]
    ids = torch.cat([input_ids[b, :n] for b, n in enumerate(lengths)])
    pos = torch.cat([torch.arange(n, device=input_ids.device) for n in lengths])
    return PackedRows(ids.unsqueeze(0), pos.unsqueeze(0), lengths, int(input_ids.shape[1]))


def packed_logprob_mask(packed: PackedRows) -> torch.Tensor:
    """[1, L] long: 1 except at each sample's first token (see module docstring)."""
    return (packed.position_ids != 0).long()


def unpack(values: torch.Tensor, packed: PackedRows) -> torch.Tensor:
    """[1, L] per-token values -> [B, T] right-padded with zeros (differentiable)."""
    rows, start = [], 0
    for n in packed.lengths:
        row = values[0, start:start + n]
        rows.append(torch.nn.functional.pad(row, (0, packed.width - n)))
        start += n
    return torch.stack(rows)
