"""Per-token log-probs and entropy from logits, in float32, optionally a chunk of
tokens at a time.

Why chunks: log-softmax in float32 over ``[tokens, vocab]`` is the largest tensor of
a long-sequence step (4k tokens x 150k vocab = 2.4 GB, plus as much again kept for
backward). ``chunk_tokens > 0`` upcasts and reduces ``chunk_tokens`` rows of logits at
a time under activation checkpointing, so forward holds one chunk's float32 copy and
backward recomputes it chunk by chunk; the logits themselves stay in the model dtype.
The result is the same to float32 rounding.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from rlpost.types import ModelOutput


def _token_stats(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (any dtype), targets [N] -> (log p(target) [N], entropy [N]) in float32."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if with_entropy:  # H = logsumexp(z) - sum_v softmax(z)_v z_v
        return logp, lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, torch.zeros_like(logp)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      with_entropy: bool, chunk_tokens: int = 0) -> ModelOutput:
    """Per-token log-probs (and entropy) aligned with ``input_ids`` (see rlpost.types).

    logits: [B, T, V] from a forward over input_ids. ``out.logprobs[:, t]`` is
    ``log p(input_ids[:, t] | input_ids[:, :t])``, i.e. uses ``logits[:, t - 1]``;
    position 0 and positions where ``attention_mask`` is 0 hold 0. Differentiable.
    ``chunk_tokens``: 0 computes all tokens at once, else that many per chunk.
    """
    B, T, V = logits.shape
    z = logits[:, :-1].reshape(-1, V)  # row b*(T-1)+t predicts input_ids[b, t+1]
    targets = input_ids[:, 1:].reshape(-1)
    if chunk_tokens <= 0 or z.shape[0] <= chunk_tokens:
        logp, ent = _token_stats(z, targets, with_entropy)
    else:
        parts = [checkpoint(_token_stats, z[s:s + chunk_tokens], targets[s:s + chunk_tokens], with_entropy,
                            use_reentrant=False)
                 for s in range(0, z.shape[0], chunk_tokens)]
        logp, ent = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    valid = attention_mask[:, 1:].to(torch.float32)
    first = torch.zeros(B, 1, dtype=torch.float32, device=logits.device)
    logprobs = torch.cat([first, logp.view(B, T - 1) * valid], dim=1)
    entropy = torch.cat([first, ent.view(B, T - 1) * valid], dim=1) if with_entropy else None
    return ModelOutput(logprobs=logprobs, entropy=entropy)
