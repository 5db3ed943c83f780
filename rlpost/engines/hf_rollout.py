"""Rollout engine on plain Hugging Face transformers: a KV-cached sampling loop.

Why not ``model.generate``: it samples from the global torch RNG (no generator
argument), applies the checkpoint's generation_config defaults (``top_k=50``,
repetition penalty, ...) unless each is overridden, and pads finished rows. The loop
here is short, owns its ``torch.Generator``, and computes each token's log-prob
from exactly the distribution it was drawn from.

Sampling, per step, in float32: ``logits / temperature`` -> top-k (ties at the k-th
value are kept) -> top-p (the smallest set of most likely tokens whose probability
reaches ``top_p``) -> ``log_softmax`` -> sample. ``Completion.logprobs`` are this
final ``log_softmax`` at the sampled tokens, i.e. log-probs under the truncated,
renormalised, tempered distribution. Greedy (temperature 0) takes the argmax and
reports its log-prob under the plain softmax.

Stopping. A row stops when it samples an EOS id (tokenizer and generation_config
EOS ids; the EOS token is kept in ``token_ids``), when its decoded text contains
one of ``params.stop`` (finish_reason "stop"), or after ``max_new_tokens``
("length"). On a stop string the completion keeps every token up to and including
the one that completed the string, and ``text`` is the decode of exactly those
tokens, so the reward always sees the text of the trained tokens; it ends with the
stop string plus whatever else that last token spells. Stop strings are searched in
the decode of the last ``len(stop) + 16`` tokens, so a stop string can be missed
only if more than 16 of those tokens decode to nothing.

Batching. The ``len(prompts) * n`` rows run in chunks of ``batch_size``, left-padded
with position ids counted from each row's first real token. Identical prompts in a
chunk (the n samples of a group) are prefilled once and their KV cache copied.
Finished rows are dropped from the batch and the cache.

Speed. Grouped KV heads go to SDPA as they are (``use_grouped_sdpa``), not copied to
the query heads at every layer and step; ``num_threads`` torch threads are set at every
``generate`` (None: the process's setting).

In-flight weight updates. ``update_weights`` may be called from another thread while
``generate`` runs: it waits for the decoding step in progress (forward + sample), loads,
and the loop goes on with the new weights (``rlpost.engines.inflight.DecodeGate``).
Every sampled token records the version that computed the logits it was drawn from
(``Completion.token_versions``; ``policy_version`` is the oldest). The KV cache built
so far is ``inflight_kv``: ``keep`` goes on with it (free, but the cached keys and
values of the earlier tokens are the old policy's, so the new policy attends to a
context it did not compute: the first tokens after the switch are neither policy's
exact sample), ``recompute`` re-prefills prompt + tokens so far with the new weights
before the next token (exactly the new policy's continuation, for one prefill of the
whole context per update and batch chunk).

Randomness: one ``torch.Generator`` seeded from ``seed`` serves all calls, so a
fixed seed and the same sequence of calls reproduce the same completions;
``SamplingParams.seed`` gives one call its own generator instead.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Sequence

import torch

from rlpost.engines.inflight import INFLIGHT_KV, DecodeGate
from rlpost.errors import ModelError
from rlpost.types import Completion, SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STOP_WINDOW_SLACK = 16  # extra tokens decoded when looking for a stop string


class HFRolloutEngine:
    """``RolloutEngine`` over ``AutoModelForCausalLM``; holds one policy version."""

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, batch_size: int = 64,
                 device: torch.device | str = "cpu", num_threads: int | None = None, inflight_kv: str = "keep"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 (or None: the process's setting), got {num_threads}")
        if inflight_kv not in INFLIGHT_KV:
            raise ValueError(f"inflight_kv must be one of {INFLIGHT_KV}, got {inflight_kv!r}")
        self.num_threads, self.inflight_kv = num_threads, inflight_kv
        self.gate = DecodeGate()  # decoding steps and weight loads take turns
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype])
        except Exception as exc:
            raise ModelError(f"cannot load model/tokenizer from {model_path!r}: {type(exc).__name__}: {exc}") from exc
        # Sampling stays on the CPU (its generator, hence the samples, do not depend on
        # the device); only the forward passes run on ``device``.
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        use_grouped_sdpa(self.model)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.policy_version = 0
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.eos_ids = _eos_ids(self.tokenizer, self.model)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self._keep_last_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._weights_ok = True  # False after an update_weights that failed part-way

    # ------------------------------------------------------------------ generate

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions for every prompt, in prompt order."""
        self._check_weights()
        _check_params(params)
        use_threads(self.num_threads)
        rows = []
        for i, prompt in enumerate(prompts):
            rows.extend([check_prompt(prompt, i, self.vocab_size)] * params.n)
        generator = self.generator if params.seed is None else torch.Generator().manual_seed(params.seed)
        completions: list[Completion] = []
        for start in range(0, len(rows), self.batch_size):
            completions.extend(self._generate_chunk(rows[start:start + self.batch_size], params, generator))
        return [completions[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if self._keep_last_logits else {}
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         position_ids=position_ids.to(self.device), past_key_values=cache, use_cache=True, **kwargs)
        return out.logits[:, -1].float().cpu()  # [B, V]

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams,
                        generator: torch.Generator) -> list[Completion]:
        batch = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        versions: list[list[int]] = [[] for _ in range(batch)]  # the policy version of every sampled token
        finish: list[str | None] = [None] * batch
        active = list(range(batch))  # rows of `prompts` still generating, in cache order
        stop_window = max((len(s) for s in params.stop), default=0) + _STOP_WINDOW_SLACK
        decode: _Decode | None = None
        sampled = torch.empty(0, dtype=torch.long)
        for step in range(params.max_new_tokens):
            # One decoding step (forward + sample) under the gate: a weight update from
            # another thread lands between two steps (rlpost.engines.inflight).
            with self.gate.step():
                self._check_weights()
                if decode is None:
                    decode, logits = self._prefill(prompts)
                elif self.inflight_kv == "recompute" and decode.version != self.policy_version:
                    # New weights since the cache was built: rebuild it from the context so far.
                    decode, logits = self._prefill([prompts[r] + tokens[r] for r in active])
                else:  # keep: go on with the cache, whichever weights computed it
                    logits = decode.advance(sampled)
                version = self.policy_version
                sampled, sampled_lp = sample_tokens(logits, params, generator)
            for row, token, lp in zip(active, sampled.tolist(), sampled_lp.tolist()):
                tokens[row].append(token)
                logprobs[row].append(lp)
                versions[row].append(version)
                if token in self.eos_ids or (params.stop and self._hits_stop(tokens[row], params.stop, stop_window)):
                    finish[row] = "stop"
            keep = [j for j, row in enumerate(active) if finish[row] is None]
            if not keep or step == params.max_new_tokens - 1:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep)
                decode.select(index)
                sampled = sampled[index]
                active = [active[j] for j in keep]
        return [self._completion(tokens[r], logprobs[r], versions[r], finish[r]) for r in range(batch)]

    def _completion(self, tokens: list[int], logprobs: list[float], versions: list[int],
                    finish: str | None) -> Completion:
        oldest = min(versions)
        return Completion(
            token_ids=tuple(tokens), logprobs=tuple(logprobs),
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason=finish or "length", policy_version=oldest,
            token_versions=None if max(versions) == oldest else tuple(versions))

    def _prefill(self, rows: list[list[int]]) -> tuple[_Decode, torch.Tensor]:
        """A fresh KV cache of ``rows`` (left-padded) and the logits of their next tokens [B, V].
        Each distinct row is computed once and its cache copied to the rows equal to it."""
        from transformers import DynamicCache

        distinct: dict[tuple[int, ...], int] = {}
        row_of = [distinct.setdefault(tuple(p), len(distinct)) for p in rows]
        unique = list(distinct)
        width = max(len(p) for p in unique)
        input_ids = torch.full((len(unique), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(unique), width), dtype=torch.long)
        for r, p in enumerate(unique):  # left padding
            input_ids[r, width - len(p):] = torch.tensor(p)
            attention_mask[r, width - len(p):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, attention_mask, position_ids, cache)
        select = torch.tensor(row_of)
        if len(unique) < len(rows):
            cache.batch_select_indices(select)
        decode = _Decode(self, cache, attention_mask[select], position_ids[select, -1] + 1, self.policy_version)
        return decode, logits[select]

    def _check_weights(self) -> None:
        if not self._weights_ok:
            raise ModelError("the last update_weights failed part-way; the model holds a mix of versions. "
                             "Send a full, valid set of weights before generating again.")

    def _hits_stop(self, tokens: list[int], stop: Sequence[str], window: int) -> bool:
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy ``(HF name, tensor)`` pairs into the model in place, then serve ``version``.

        Names are those of ``model.state_dict()``; with tied embeddings either name
        of the tied pair may be sent (or both). Every parameter must be covered.
        A ``rlpost.sync.transport`` stream is handed the model's own tensors first
        (``load_into``), so tensors that travel alone are received straight into
        the parameters and nothing is left to copy; any other tensor is copied in
        one pass (dtype and device conversion included). The iterator is always
        consumed to the end, even on error, so a streaming sender is never left
        waiting; the error is raised afterwards and the engine refuses to generate
        until a good update arrives.
        """
        # Between two decoding steps of a generate running in another thread, if any.
        with self.gate.load():
            self._load(weights, version)

    def _load(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        # Detached views of the live storage, rebuilt per sync (a few ms), so a model
        # moved to another device since the last sync is still written in place.
        state = {name: t.detach() for name, t in self.model.state_dict(keep_vars=True).items()}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        load_into = getattr(weights, "load_into", None)
        if load_into is not None:
            load_into(state)
        updated: set[int] = set()  # storage addresses of updated parameters
        error: str | None = None
        received = 0
        self._weights_ok = False
        for name, tensor in weights:
            received += 1
            if error is not None:
                continue  # drain
            target = state.get(name)
            if target is None:
                close = difflib.get_close_matches(name, state.keys(), n=3)
                error = f"unknown weight name {name!r}" + (f"; did you mean {close}?" if close else "")
            elif tuple(tensor.shape) != tuple(target.shape):
                error = f"weight {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
            else:
                in_place = (tensor.data_ptr() == target.data_ptr() and tensor.device == target.device
                            and tensor.dtype == target.dtype and tensor.stride() == target.stride())
                if not in_place:  # in place: the stream received it straight into the model
                    target.copy_(tensor)
                updated.add(target.data_ptr())
        if error is None:
            if received == 0:
                error = "received no tensors"
            else:
                missing = sorted(n for n, p in params.items() if p.data_ptr() not in updated)
                if missing:
                    error = f"{len(missing)} parameters were not sent, e.g. {missing[:3]}"
        if error is not None:
            raise ModelError(f"update_weights to version {version} failed: {error}. "
                             f"Weight names must match the rollout model's state_dict.")
        self._weights_ok = True
        self.policy_version = version


class _Decode:
    """The KV cache of the rows still generating and what their next forward needs."""

    def __init__(self, engine: HFRolloutEngine, cache, attention_mask: torch.Tensor, next_pos: torch.Tensor,
                 version: int):
        self.engine, self.cache = engine, cache
        self.attention_mask, self.next_pos = attention_mask, next_pos  # [A, T] long, [A] long
        self.version = version  # the weights that computed the cache's first entries

    def advance(self, sampled: torch.Tensor) -> torch.Tensor:
        """Feed the tokens just sampled [A]; the logits of the next ones [A, V]."""
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(sampled), 1)], dim=1)
        logits = self.engine._forward(sampled[:, None], self.attention_mask, self.next_pos[:, None], self.cache)
        self.next_pos = self.next_pos + 1
        return logits

    def select(self, index: torch.Tensor) -> None:
        self.cache.batch_select_indices(index)
        self.attention_mask, self.next_pos = self.attention_mask[index], self.next_pos[index]


def sample_tokens(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` [B, V] (float32) and its log-prob under the
    distribution it was drawn from. Returns ``(tokens [B] long, logprobs [B] float32)``."""
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        logits = logits / params.temperature
        if 0 < params.top_k < logits.shape[-1]:
            kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the more likely ones already reach top_p; the most
            # likely token always survives.
            drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


_GROUPED_SDPA = "rlpost_grouped_sdpa"


def use_grouped_sdpa(model) -> bool:
    """Switch ``model`` from transformers' ``sdpa`` attention to one that hands grouped
    KV heads (GQA) to SDPA as they are. Returns whether it switched.

    Why: with an attention mask (every left-padded batch has one) transformers 5.19
    expands the KV heads to the query heads with a copy (``repeat_kv``) at every layer
    and step, because masked GQA is slow on CUDA. On CPU, SDPA's ``enable_gqa`` with a
    mask is exact and was about 4x faster per decode step (24M Qwen2, 128 rows, 8:2
    heads): the copies were about a third of the sampling loop's time. Masks are built
    as for ``sdpa``. Models on other attention implementations are left alone.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False

    def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if (getattr(module, "num_key_value_groups", 1) == 1 or query.device.type != "cpu"
                or kwargs.get("cache") is not None or dropout):  # e.g. moved to a GPU later: transformers' path
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True,
            is_causal=bool(query.shape[2] > 1 and attention_mask is None and causal))
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(_GROUPED_SDPA, grouped_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_GROUPED_SDPA, sdpa_mask)
    model.set_attn_implementation(_GROUPED_SDPA)
    return True


def use_threads(num_threads: int | None) -> None:
    """Compute with ``num_threads`` torch threads from here on (None: leave the
    process's setting). Set at every call, not once: in sync mode the trainer and the
    rollout engine take turns, and a process hosting both may have changed it since."""
    if num_threads is not None and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


def check_prompt(prompt: Sequence[int], index: int, vocab_size: int) -> list[int]:
    """``prompt`` as a list of ints; a clear error for an empty prompt or ids outside the vocabulary."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError(f"prompt {index} is empty; every prompt needs at least one token")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ValueError(f"prompt {index} has token ids outside [0, {vocab_size})")
    return prompt


def _check_params(params: SamplingParams) -> None:
    if params.n < 1:
        raise ValueError(f"SamplingParams.n must be >= 1, got {params.n}")
    if params.max_new_tokens < 1:
        raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {params.top_p}")
    if any(not s for s in params.stop):
        raise ValueError("SamplingParams.stop must not contain an empty string")


def _eos_ids(tokenizer, model) -> frozenset[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None),
                  getattr(model.config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
