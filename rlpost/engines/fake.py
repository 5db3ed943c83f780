"""Fakes of the engine interfaces, shipped with them so that users and tests can run
the whole controller without a language model.

``FakeRolloutEngine`` produces deterministic pseudo-random completions;
``FakeTrainEngine`` is a real (tiny) model, a bigram table trained with real
gradients and AdamW, so a test can watch its loss go down. Both run in
milliseconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from rlpost.engines.base import LossFn
from rlpost.types import Completion, ModelOutput, SamplingParams, TrainBatch


def digits_decode(token_ids: Sequence[int]) -> str:
    """Default fake detokenizer: ids as space-separated numbers ("17 4 250"), so a
    math reward's last-number fallback has something to read."""
    return " ".join(str(t) for t in token_ids)


class FakeRolloutEngine:
    """``RolloutEngine`` without a model.

    Completion ``j`` of a prompt is drawn from a ``random.Random`` keyed by (engine
    seed, ``params.seed``, this engine's call count, policy version, prompt, j): a
    fixed seed and the same calls give the same completions, like the real engine,
    and a weight update changes them. Greedy (temperature 0) completions depend only
    on (prompt, policy version), so the n of a group are identical.

    A fraction ``length_fraction`` of completions runs to ``max_new_tokens`` without
    EOS ("length"); the others have a length uniform in [1, max_new_tokens] and end
    with ``eos_id`` ("stop"). Other tokens are uniform over the vocabulary minus EOS.
    Every logprob is ``-log(vocab_size)``. A stop string cuts the completion after
    the token whose decode completes it ("stop"). ``decode`` (ids without the EOS ->
    text) defaults to ``digits_decode``. The defaults (512 tokens, EOS id 2) match
    the built-in tiny-math tokenizer, so fake token ids are valid for the real
    trainer.
    """

    def __init__(self, vocab_size: int = 512, eos_id: int = 2, seed: int = 0,
                 decode: Callable[[Sequence[int]], str] | None = None, length_fraction: float = 0.25):
        if not 0 <= eos_id < vocab_size or vocab_size < 2:
            raise ValueError(f"need vocab_size >= 2 and 0 <= eos_id < vocab_size, got {vocab_size}, {eos_id}")
        self.vocab_size, self.eos_id, self.seed = vocab_size, eos_id, seed
        self.decode = decode or digits_decode
        self.length_fraction = length_fraction
        self.policy_version = 0
        self.calls = 0  # generate() calls so far
        self.weight_updates = 0  # update_weights() calls so far
        self.last_weight_names: list[str] = []

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        if params.n < 1 or params.max_new_tokens < 1:
            raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got {params.n}, {params.max_new_tokens}")
        call = self.calls
        self.calls += 1
        return [[self._complete(tuple(int(t) for t in prompt), j, call, params) for j in range(params.n)]
                for prompt in prompts]

    def _complete(self, prompt: tuple[int, ...], j: int, call: int, params: SamplingParams) -> Completion:
        key = (("greedy", self.policy_version, prompt) if params.greedy else
               (self.seed, params.seed, call if params.seed is None else None, self.policy_version, prompt, j))
        rng = random.Random(hashlib.blake2b(repr(key).encode(), digest_size=8).digest())
        limit = params.max_new_tokens
        if rng.random() < self.length_fraction:
            tokens, finish = [self._non_eos(rng) for _ in range(limit)], "length"
        else:
            length = rng.randint(1, limit)
            tokens, finish = [self._non_eos(rng) for _ in range(length - 1)] + [self.eos_id], "stop"
        for k in range(1, len(tokens) + 1) if params.stop else ():
            if any(s in self.decode(tokens[:k]) for s in params.stop):
                tokens, finish = tokens[:k], "stop"
                break
        text_ids = [t for t in tokens if t != self.eos_id]
        return Completion(
            token_ids=tuple(tokens),
            logprobs=(-math.log(self.vocab_size),) * len(tokens),
            text=self.decode(text_ids),
            finish_reason=finish,
            policy_version=self.policy_version,
        )

    def _non_eos(self, rng: random.Random) -> int:
        token = rng.randrange(self.vocab_size - 1)
        return token + 1 if token >= self.eos_id else token

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Consumes the iterator (a streaming sender must not be left waiting),
        records the names and serves ``version``."""
        self.last_weight_names = [name for name, _ in weights]
        self.weight_updates += 1
        self.policy_version = version


class _Bigram(nn.Module):
    """logits(next token | token) = table[token]: the smallest model with real gradients."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, V]
        return self.table(input_ids)


class FakeTrainEngine:
    """``TrainEngine`` (a single rank) over a bigram table, with real AdamW.

    Log-probs follow the ``rlpost.types`` alignment: ``logprobs[b, t] = log p(ids[b, t]
    | ids[b, t-1])`` at ``temperature``, 0 at position 0 and at padding.
    ``named_full_weights`` yields one tensor, ``"table.weight"`` [V, V].
    ``save``/``load`` write/read ``fake_train_engine.pt`` (weights, optimizer, step) in
    a directory. ``export_hf`` writes that file plus a ``config.json`` marking it as a
    fake: transformers cannot load it, since there is no HF model to export.
    """

    def __init__(self, vocab_size: int = 512, lr: float = 1e-2, seed: int = 0, temperature: float = 1.0,
                 grad_clip: float = 1.0, weight_decay: float = 0.0):
        gen = torch.Generator().manual_seed(seed)
        self.model = _Bigram(vocab_size)
        with torch.no_grad():
            self.model.table.weight.copy_(torch.randn(vocab_size, vocab_size, generator=gen) * 0.02)
        self.vocab_size, self.lr, self.temperature, self.grad_clip = vocab_size, lr, temperature, grad_clip
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.step = 0

    def _forward(self, batch: TrainBatch, with_entropy: bool) -> ModelOutput:
        ids = batch.input_ids.masked_fill(batch.attention_mask == 0, 0)  # pad ids may be anything
        mask = batch.attention_mask[:, 1:].float()
        logp_all = torch.log_softmax(self.model(ids[:, :-1]).float() / self.temperature, dim=-1)  # [B, T-1, V]
        logprobs = torch.zeros(ids.shape, dtype=torch.float32)
        logprobs[:, 1:] = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask
        entropy = None
        if with_entropy:
            entropy = torch.zeros(ids.shape, dtype=torch.float32)
            entropy[:, 1:] = -(logp_all.exp() * logp_all).sum(-1) * mask
        return ModelOutput(logprobs=logprobs, entropy=entropy)

    @torch.no_grad()
    def forward_logprobs(self, batch: TrainBatch, *, with_entropy: bool = False,
                         micro_batch_size: int | None = None) -> ModelOutput:
        parts = [self._forward(mb, with_entropy) for mb in batch.chunks(micro_batch_size or max(batch.size, 1))]
        if not parts:
            return self._forward(batch, with_entropy)
        return ModelOutput(logprobs=torch.cat([p.logprobs for p in parts]),
                           entropy=torch.cat([p.entropy for p in parts]) if with_entropy else None)

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, micro_batch_size: int, *,
                   return_logprobs: bool = False):
        """Like FSDPEngine: a non-finite loss or gradient skips the update (no
        optimizer step) and reports ``skipped=1.0``; the controller decides when to stop.
        ``return_logprobs``: ``(metrics, the training forward's detached log-probs)``."""
        if return_logprobs:
            seen: list[torch.Tensor] = []
            metrics = self.train_step(batch, _recording(loss_fn, seen), micro_batch_size)
            return metrics, (torch.cat(seen) if seen else torch.zeros(tuple(batch.input_ids.shape)))
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        finite = True
        for micro in batch.chunks(micro_batch_size):
            loss, micro_metrics = loss_fn(self._forward(micro, with_entropy=True), micro)
            finite = finite and bool(torch.isfinite(loss))
            loss.backward()
            for key, value in micro_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + float(value)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if not (finite and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return {**metrics, "grad_norm": float(grad_norm), "lr": self.lr, "skipped": 1.0}
        self.optimizer.step()
        self.step += 1
        return {**metrics, "grad_norm": float(grad_norm), "lr": self.lr, "skipped": 0.0}

    def named_full_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.detach().clone()

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step},
                   os.path.join(path, "fake_train_engine.pt"))

    def load(self, path: str) -> None:
        state = torch.load(os.path.join(path, "fake_train_engine.pt"), weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]

    def export_hf(self, path: str, tokenizer_path: str | None = None) -> None:
        # tokenizer_path is accepted for the TrainEngine signature; a bigram has no tokenizer.
        self.save(path)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "rlpost-fake-bigram", "vocab_size": self.vocab_size,
                       "note": "written by FakeTrainEngine; not loadable by transformers"}, f, indent=2)


def _recording(loss_fn: LossFn, seen: list[torch.Tensor]) -> LossFn:
    """``loss_fn`` that also keeps each micro-batch's log-probs, detached, in ``seen``."""
    def record(out: ModelOutput, mb: TrainBatch):
        seen.append(out.logprobs.detach())
        return loss_fn(out, mb)

    return record


class FakeValueEngine(FakeTrainEngine):
    """A value-model ``TrainEngine`` (a PPO critic) over a table of one value per token
    id, with real AdamW: ``values[b, t] = table[ids[b, t - 1]]``, the value of the state
    whose last token is ``ids[b, t - 1]`` (the ``rlpost.types`` alignment), 0 at position
    0 and at padding. The table starts at ``init_value`` everywhere, so a test can
    hand-compute GAE on the first step. Checkpoints as ``FakeTrainEngine``.
    """

    def __init__(self, vocab_size: int = 512, lr: float = 1e-2, init_value: float = 0.0, grad_clip: float = 1.0):
        super().__init__(vocab_size, lr=lr, grad_clip=grad_clip)
        self.model = nn.Module()
        self.model.table = nn.Embedding(vocab_size, 1)
        with torch.no_grad():
            self.model.table.weight.fill_(init_value)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)

    def _forward(self, batch: TrainBatch, with_entropy: bool) -> ModelOutput:
        ids = batch.input_ids.masked_fill(batch.attention_mask == 0, 0)
        values = torch.zeros(ids.shape, dtype=torch.float32)
        values[:, 1:] = self.model.table(ids[:, :-1]).squeeze(-1) * batch.attention_mask[:, 1:]
        return ModelOutput(logprobs=None, values=values)

    @torch.no_grad()
    def forward_values(self, batch: TrainBatch, *, micro_batch_size: int | None = None) -> ModelOutput:
        return self._forward(batch, with_entropy=False)

    def forward_logprobs(self, batch: TrainBatch, *, with_entropy: bool = False,
                         micro_batch_size: int | None = None) -> ModelOutput:
        raise RuntimeError("FakeValueEngine is a value model: use forward_values")
