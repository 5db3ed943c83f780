"""Shared-prompt forward (``trainer.share_prompt``): rows of a micro-batch that begin
with the same tokens run those tokens once.

Why: in GRPO every prompt has ``n`` completions, so a padded forward computes each
prompt ``n`` times, forward and backward. Here each group of rows with a common prefix
runs the prefix once with a key/value cache; each layer's keys/values are then indexed
out to the group's rows (``index_select``, so the gradient of every row flows back into
the one prefix forward) and the rows' remaining tokens run against that cache, with
position ids continuing after the prefix. Attention, positions and logits are those of
the plain forward, so log-probs, entropy and gradients match it to float rounding.

Groups are found from the token ids alone, so a batch need not carry prompt lengths:
rows sorted by their tokens put rows with a common prefix next to each other; a run of
sorted rows is one group whose prefix is the run's shortest adjacent common prefix,
capped one token short of its shortest row (each row keeps a token to score against
the prefix's last logits). A run is split where that saves more recomputed tokens
(``plan``). The prefix may reach into identical completion tokens; that is still exact.

Output follows ``rlpost.types``: ``[B, T]`` aligned with ``input_ids``, position 0
and padding 0. Torch and transformers' ``DynamicCache`` only; algorithm-blind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rlpost.engines.logprobs import sequence_logprobs
from rlpost.errors import ModelError
from rlpost.types import ModelOutput


def enabled(setting: bool | None, device: torch.device, packing: bool, checkpointing: bool, config) -> bool:
    """``trainer.share_prompt`` for an engine: ``True``/``False`` as set; ``None`` (auto)
    turns it on where it was measured faster and applies: a CPU engine (train steps
    0.54-0.71 of the padded forward's time on the 24M and 0.6M shapes,
    docs/performance.md; not measured on GPUs yet, where it stays off), without
    ``trainer.packing`` or activation checkpointing (which it cannot combine with),
    and a model whose every layer keeps full attention (``config.layer_types``: a
    sliding-window or linear-attention layer has no plain key/value cache)."""
    if setting is not None:
        return setting
    layer_types = getattr(config, "layer_types", None) or ()
    return (device.type == "cpu" and not packing and not checkpointing
            and all(t == "full_attention" for t in layer_types))


@dataclass(frozen=True)
class PrefixPlan:
    """``group[b]``: the group of row b; ``prefix[g]``: the shared prefix length of
    group g (>= 1); ``first[g]``: a row of group g (its prefix tokens are the group's)."""

    group: list[int]
    prefix: list[int]
    first: list[int]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plan(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PrefixPlan:
    """Groups of rows with a common prefix (see module docstring). Right-padded rows."""
    lengths = [int(n) for n in attention_mask.sum(dim=1).tolist()]
    rows = [ids[:n] for ids, n in zip(input_ids.tolist(), lengths)]
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    # lcp[k]: common prefix of sorted rows k and k+1.
    lcp = [_common_prefix(rows[order[k]], rows[order[k + 1]]) for k in range(len(order) - 1)]

    def shared(lo: int, hi: int) -> int:
        """Prefix of sorted rows lo..hi-1; 0 when they share none. A row alone runs all
        but its last token as its "prefix" (at least 1)."""
        cap = min(lengths[order[k]] for k in range(lo, hi)) - 1
        return max(cap, 1) if hi - lo == 1 else max(0, min([cap] + lcp[lo:hi - 1]))

    def best(lo: int, hi: int) -> tuple[int, list[tuple[int, int]]]:
        """(tokens saved, runs) for sorted rows lo..hi-1: one run, or split at the
        weakest link when the two halves save more or the rows share nothing."""
        p = shared(lo, hi)
        if hi - lo < 2:
            return 0, [(lo, hi)]
        cut = min(range(lo, hi - 1), key=lambda k: lcp[k]) + 1
        left, right = best(lo, cut), best(cut, hi)
        if p == 0 or left[0] + right[0] > (hi - lo - 1) * p:
            return left[0] + right[0], left[1] + right[1]
        return (hi - lo - 1) * p, [(lo, hi)]

    group, prefix, first = [0] * len(rows), [], []
    for g, (lo, hi) in enumerate(best(0, len(rows))[1] if rows else []):
        prefix.append(shared(lo, hi))
        first.append(order[lo])
        for k in range(lo, hi):
            group[order[k]] = g
    return PrefixPlan(group, prefix, first)


def _scores(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, temperature: float,
            with_entropy: bool, chunk_tokens: int) -> ModelOutput:
    if temperature != 1.0:
        logits = logits / temperature  # as rlpost.engines.microbatch.forward
    return sequence_logprobs(logits, ids, mask, with_entropy, chunk_tokens)


def forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            temperature: float, with_entropy: bool, chunk_tokens: int = 0) -> ModelOutput:
    """Log-probs (and entropy) ``[B, T]`` of right-padded rows, prefixes shared."""
    B, T = input_ids.shape
    device = input_ids.device
    p = plan(input_ids, attention_mask)
    group = torch.tensor(p.group, device=device)
    prefix_len = torch.tensor(p.prefix, device=device)  # [G]
    row_prefix = prefix_len[group]  # [B]
    lengths = attention_mask.sum(dim=1)
    P = max(p.prefix)
    cols = torch.arange(T, device=device)

    # 1. Each group's prefix once: [G, P], right-padded.
    prefix_mask = (cols[:P].unsqueeze(0) < prefix_len.unsqueeze(1)).long()
    prefix_ids = input_ids[torch.tensor(p.first, device=device), :P] * prefix_mask
    prefix_pos = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=prefix_pos, use_cache=True)
    cache = out.past_key_values
    if cache is None or any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise ModelError(f"{type(model).__name__} returned no plain per-layer key/value cache "
                         "(sliding-window or hybrid layers?); trainer.share_prompt needs one")
    # Each row's view of its group's keys/values; index_select sends their gradients back.
    past = DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, group), layer.values.index_select(0, group))
                                        for layer in cache.layers])

    # 2. The rest of every row: [B, S] after its group's prefix, positions continuing.
    rest_len = lengths - row_prefix
    S = max(int(rest_len.max()), 1)
    take = (row_prefix.unsqueeze(1) + cols[:S].unsqueeze(0)).clamp(max=T - 1)  # [B, S]
    rest_mask = (cols[:S].unsqueeze(0) < rest_len.unsqueeze(1)).long()
    rest_ids = input_ids.gather(1, take) * rest_mask
    rest_pos = row_prefix.unsqueeze(1) + cols[:S].unsqueeze(0)
    mask = torch.cat([prefix_mask[group], rest_mask], dim=1)  # [prefix (pads masked) | rest]
    rest_logits = model(input_ids=rest_ids, attention_mask=mask, position_ids=rest_pos, past_key_values=past,
                        use_cache=True).logits

    # 3. Scores. Prefix tokens 1..p-1 from the prefix forward (one per group); the first
    # token after the prefix scores against the prefix's last logits, so the rest is
    # scored as [last prefix logits | rest logits] over [last prefix token | rest ids].
    head = _scores(out.logits, prefix_ids, prefix_mask, temperature, with_entropy, chunk_tokens)
    last = out.logits[torch.arange(len(p.prefix), device=device), prefix_len - 1][group].unsqueeze(1)
    last_id = input_ids.gather(1, (row_prefix - 1).unsqueeze(1))
    tail = _scores(torch.cat([last, rest_logits], dim=1), torch.cat([last_id, rest_ids], dim=1),
                   torch.cat([torch.ones_like(last_id), rest_mask], dim=1), temperature, with_entropy, chunk_tokens)

    def assemble(head_values: torch.Tensor, tail_values: torch.Tensor) -> torch.Tensor:
        """[B, T]: t < prefix from the row's group's prefix, else from its rest."""
        in_prefix = cols.unsqueeze(0) < row_prefix.unsqueeze(1)
        from_head = head_values[group].gather(1, cols.clamp(max=P - 1).unsqueeze(0).expand(B, T))
        at = (cols.unsqueeze(0) - row_prefix.unsqueeze(1) + 1).clamp(min=0, max=S)
        from_tail = tail_values.gather(1, at)
        real = attention_mask.to(torch.float32)
        return torch.where(in_prefix, from_head, from_tail) * real

    assert head.logprobs is not None and tail.logprobs is not None  # sequence_logprobs always sets them
    entropy = None
    if with_entropy:
        assert head.entropy is not None and tail.entropy is not None
        entropy = assemble(head.entropy, tail.entropy)
    return ModelOutput(logprobs=assemble(head.logprobs, tail.logprobs), entropy=entropy)
