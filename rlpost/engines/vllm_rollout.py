"""Rollout engine on vLLM, run in-process, with in-place weight updates.

Matches ``HFRolloutEngine`` semantics (``rlpost.engines.hf_rollout``), so the two are
interchangeable behind ``RolloutEngine``:

- ``token_ids`` keep the EOS token when it ended the sample (vLLM 0.32 returns it in
  ``CompletionOutput.token_ids``; it only leaves it out of the text).
- On a stop string the completion keeps every token up to and including the one
  that completed the string (vLLM 0.32 drops the later ones), and ``text`` is the
  decode of exactly those tokens, special tokens skipped, so the reward sees the
  text of the trained tokens. vLLM's own ``text`` is not used.
- ``logprobs`` are the sampler's: the engine runs with
  ``logprobs_mode="processed_logprobs"``, i.e. ``log_softmax`` after temperature,
  top-k and top-p, at the sampled token (``SamplingParams.logprobs=0`` asks for the
  sampled token only). vLLM's default, ``raw_logprobs``, would report the
  untempered, untruncated distribution and bias the importance ratio whenever
  temperature != 1 or top-k/top-p is on. Greedy requests report the plain softmax,
  as the HF engine does.
- Randomness belongs to the engine: every request gets an explicit vLLM seed drawn
  from the engine's ``torch.Generator`` (or, for a call with ``SamplingParams.seed``,
  from a generator seeded with it), so a fixed engine seed and the same sequence of
  calls reproduce the same completions. vLLM gives the ``n`` samples of a prompt
  seeds ``s, s+1, ...``. Unseeded vLLM requests would draw from the process-global
  torch RNG instead. vLLM refuses ``n > 1`` with greedy sampling, so greedy calls
  ask for one sample and repeat it ``n`` times.

vLLM 0.32 on CPU needs three workarounds, each in one named place below: a tied LM
head is not repacked by an in-place reload (``_repack_tied_lm_head``); a seeded
request whose prefill is chunked crashes the CPU sampler (chunked prefill is off);
and the CPU worker replaces ``torch.set_num_threads`` process-wide
(``_restore_set_num_threads``).

Threads. In-process vLLM computes with this process's torch intra-op threads; its
``VLLM_CPU_OMP_THREADS_BIND`` / ``VLLM_CPU_NUM_OF_RESERVED_CPU`` only act on the worker
processes of the multiprocess executor, which this engine does not use. So
``num_threads`` is applied with ``torch.set_num_threads`` at construction and at every
``generate`` (in sync mode the trainer may have changed it in between); None leaves
the process's setting.

Weight updates go through vLLM's in-place reload (``reload_weights``, the
checkpoint-format path that re-runs any weight repacking the CPU kernels need): the
incoming ``(HF name, tensor)`` iterator is streamed straight into the model loader,
which keeps at most about one layer of pending tensors, never a second full copy.
Then the prefix cache, computed with the old weights, is dropped.

In-flight weight updates. ``generate`` drives the engine itself, one ``step()`` at a
time (``LLMEngine.add_request`` with one n=1 request per sample, seeded as vLLM seeds
the children of an n-sample request, and ``RequestOutputKind.DELTA``), each step under
a ``DecodeGate``: ``update_weights`` from another thread lands between two steps and
the tokens of later steps record its version (``Completion.token_versions``).
``inflight_kv=keep`` goes on with the running requests' KV cache (the prefix cache is
reset once they finish); ``recompute`` preempts them at the next step
(``reset_prefix_cache(reset_running_requests=True)``), so vLLM re-prefills prompt +
tokens so far with the new weights. A seeded request's sampler generator is not
rewound on that re-prefill, so the tokens after a recompute are a valid sample of the
new policy but not the ones an uninterrupted request of the same seed would draw.

Process model. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` runs vLLM's engine core and its
single worker inside this process: no child processes (so it lives inside a Ray
actor), about 2 s to start, and ``collective_rpc`` calls the worker directly, which
is what lets ``update_weights`` hand it a live iterator. What differs on GPU: the
in-process mode works there too for ``tensor_parallel_size=1``; with tensor
parallelism vLLM needs its worker processes, tensors do not survive
``collective_rpc`` pickling, and weights must instead arrive inside each worker
(a ``worker_extension_cls`` method joining the NCCL weight-sync group and calling
``model_runner.reload_weights``), with ``enable_sleep_mode`` to free the KV cache
while a colocated trainer runs. The colocated GPU path (one GPU shared with a trainer
rank: sleep mode plus vLLM's CUDA IPC weight-transfer engine) is in
``rlpost.engines.colocate``; the methods it drives are at the end of this class.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from rlpost.engines.hf_rollout import use_threads
from rlpost.engines.inflight import INFLIGHT_KV, DecodeGate
from rlpost.errors import ModelError
from rlpost.types import Completion, SamplingParams

_DTYPES = ("float32", "bfloat16", "float16")
_SEED_HIGH = 2**62  # per-request seeds; vLLM adds the sample index, so stay below 2**63
_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32 CPU attention


class VLLMRolloutEngine:
    """``RolloutEngine`` over ``vllm.LLM`` in this process; holds one policy version.

    ``kv_cache_gb`` sizes the KV cache explicitly (required on CPU, where vLLM's
    memory probe refuses to start on small NUMA nodes); 0 lets vLLM size it from
    ``gpu_memory_utilization`` (GPU). ``max_model_len`` caps prompt + completion
    tokens (None: the model's own limit).
    """

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, max_model_len: int | None = None,
                 kv_cache_gb: float = 1.0, gpu_memory_utilization: float = 0.5, enforce_eager: bool = True,
                 colocate: bool = False, num_threads: int | None = None, inflight_kv: str = "keep"):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        if kv_cache_gb < 0:
            raise ValueError(f"kv_cache_gb must be >= 0 (0 = size from gpu_memory_utilization), got {kv_cache_gb}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 (or None: the process's setting), got {num_threads}")
        if inflight_kv not in INFLIGHT_KV:
            raise ValueError(f"inflight_kv must be one of {INFLIGHT_KV}, got {inflight_kv!r}")
        self.num_threads, self.inflight_kv = num_threads, inflight_kv
        self.gate = DecodeGate()  # engine steps and weight loads take turns
        self._recompute = False  # recompute: new weights since the running requests' KV was computed
        self._prefix_stale = False  # the prefix cache holds blocks of old weights (requests were running)
        self._calls = itertools.count()
        # Must be set before vLLM reads its environment (at engine construction).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ModelError("VLLMRolloutEngine runs vLLM in-process; unset VLLM_ENABLE_V1_MULTIPROCESSING "
                             "or set it to 0")
        from vllm import LLM

        self._tied = _tied_embeddings(model_path)
        self._checkpoint = _checkpoint_shapes(model_path)
        if self._tied:  # one tensor, received under either name (see _WeightStream)
            self._checkpoint.pop("lm_head.weight", None)
        _check_cpu_head_size(model_path)
        kwargs = dict(model=model_path, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                      max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                      gpu_memory_utilization=gpu_memory_utilization,
                      # vLLM 0.32 rewinds a seeded request's generator after a partial
                      # (chunked) prefill with Generator.set_offset, which CPU generators
                      # lack ("CPU Generator does not use offset"); every request here is
                      # seeded, so prompts are prefilled whole.
                      enable_chunked_prefill=False)
        if kv_cache_gb > 0:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if colocate:  # GPU only, see rlpost.engines.colocate
            from rlpost.engines.colocate import require_gpus

            require_gpus()
            kwargs.update(enable_sleep_mode=True, weight_transfer_config={"backend": "ipc"})
        set_num_threads = torch.set_num_threads
        use_threads(num_threads)  # before vLLM patches set_num_threads (see _restore_set_num_threads)
        try:
            self.llm = LLM(**kwargs)
        except Exception as exc:
            raise ModelError(f"vLLM cannot load {model_path!r}: {type(exc).__name__}: {exc}") from exc
        finally:
            _restore_set_num_threads(set_num_threads)
        quiet_weightless_reload_warnings(tied_head=self._tied)
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.generator = torch.Generator().manual_seed(seed)
        self.policy_version = 0
        self._weights_ok = True  # False after an update_weights that failed part-way

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions for every prompt, in prompt order."""
        from vllm.inputs import TokensPrompt

        from rlpost.engines.hf_rollout import check_prompt

        use_threads(self.num_threads)
        if not self._weights_ok:
            raise ModelError("the last update_weights failed part-way; the model holds a mix of versions. "
                             "Send a full, valid set of weights before generating again.")
        _check_params(params)
        requests = []
        for i, prompt in enumerate(prompts):
            requests.append(TokensPrompt(prompt_token_ids=check_prompt(prompt, i, self.vocab_size)))
        if not requests:
            return []
        generator = self.generator if params.seed is None else torch.Generator().manual_seed(params.seed)
        seeds = torch.randint(0, _SEED_HIGH, (len(requests),), generator=generator).tolist()
        # vLLM refuses n > 1 with greedy sampling; the n greedy samples are one sample repeated.
        copies = params.n if params.greedy else 1
        samples = params.n // copies
        # One n=1 request per sample, seeded s + j as vLLM seeds the j-th child of an
        # n-sample request (same samples), so each sample's tokens arrive step by step.
        engine, call = self.llm.llm_engine, next(self._calls)
        partial: dict[str, _Sample] = {}
        for i, request in enumerate(requests):
            for j in range(samples):
                rid = f"rlpost-{call}-{i}-{j}"
                engine.add_request(rid, request, _vllm_params(params, seeds[i] + j, 1))
                partial[rid] = _Sample()
        try:
            self._drive(engine, partial)
        except BaseException:
            engine.abort_request([rid for rid, s in partial.items() if s.finish is None], internal=False)
            raise
        if self._prefix_stale and not engine.has_unfinished_requests():
            self._prefix_stale = not self.llm.reset_prefix_cache()
        done = [self._completion(s) for s in partial.values()]
        return [done[i * samples:(i + 1) * samples] * copies for i in range(len(requests))]

    def _drive(self, engine, partial: dict[str, _Sample]) -> None:
        """Step the engine until every request of ``partial`` finished. One engine step
        (schedule, forward, sample) under the gate: a weight update from another thread
        lands between two steps, and the tokens of later steps record its version."""
        while any(s.finish is None for s in partial.values()):
            with self.gate.step():
                if not self._weights_ok:
                    raise ModelError("the last update_weights failed part-way; the model holds a mix of "
                                     "versions. Send a full, valid set of weights before generating again.")
                if self._recompute:
                    # Preempt the running requests: vLLM re-prefills prompt + tokens so far
                    # (now with the new weights) before their next token.
                    engine.reset_prefix_cache(reset_running_requests=True)
                    self._recompute = self._prefix_stale = False
                outputs = engine.step()
                version = self.policy_version
            for out in outputs:
                sample = partial.get(out.request_id)
                if sample is not None:
                    sample.add(out.outputs[0], version, out.finished)

    def _completion(self, sample: _Sample) -> Completion:
        token_ids = tuple(sample.token_ids)
        if sample.finish not in ("stop", "length"):
            raise ModelError(f"vLLM finished a request with {sample.finish!r}; expected stop or length")
        if len(sample.logprobs) != len(token_ids) or len(sample.versions) != len(token_ids):
            raise ModelError("vLLM returned no sampler log-prob for some tokens")
        oldest = min(sample.versions, default=self.policy_version)
        return Completion(
            token_ids=token_ids,
            logprobs=tuple(sample.logprobs),
            text=self.tokenizer.decode(list(token_ids), skip_special_tokens=True),
            finish_reason=sample.finish,
            policy_version=oldest,
            token_versions=tuple(sample.versions) if sample.versions and max(sample.versions) != oldest else None,
        )

    # ------------------------------------------------------------------ weights

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Reload ``(HF name, tensor)`` pairs into the running model in place, then serve ``version``.

        Names and shapes are those of the checkpoint the engine started from (the
        HF ``state_dict``); with tied embeddings either name of the tied pair may be
        sent (or both; the first one received is used). Every weight must be
        covered. Tensors are streamed into vLLM's loader one at a time. A
        ``rlpost.sync.transport`` stream is deliberately not given ``load_into``: the
        loader keeps a layer's tensors until the layer is complete and then repacks
        them (CPU kernels), so they must not be views into the stream's reused
        buffers, and vLLM's kernel tensors are not the checkpoint's to receive into.
        The iterator is always consumed to the end, even on error, so a streaming sender
        (``rlpost.sync.transport``) is never left waiting; the error is raised
        afterwards and the engine refuses to generate until a good update arrives.
        """
        # Between two engine steps of a generate running in another thread, if any.
        with self.gate.load():
            self._load(weights, version)

    def _load(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        check = _WeightStream(weights, self._checkpoint, self._tied)
        self._weights_ok = False
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(check),
                                                              "is_checkpoint_format": True})
            if self._tied:
                self.llm.collective_rpc(_repack_tied_lm_head)
        except Exception as exc:  # vLLM rejected a tensor: keep draining, then report it
            check.fail(f"vLLM could not load the weights: {type(exc).__name__}: {exc}")
        check.drain()
        # With requests running vLLM keeps the prefix cache (their blocks are in use):
        # recompute preempts them at the next step; keep resets it once they are done.
        running = self.llm.llm_engine.has_unfinished_requests()
        if running and self.inflight_kv == "recompute":
            self._recompute = True
        elif not self.llm.reset_prefix_cache():
            self._prefix_stale = True
        if check.error is not None:
            raise ModelError(f"update_weights to version {version} failed: {check.error}. "
                             f"Weight names must match the rollout model's checkpoint (HF state_dict).")
        self._weights_ok = True
        self.policy_version = version


    # ------------------------------------------- colocated GPU placement only
    # (rlpost.engines.colocate has the contract; vLLM's sleep mode and weight-transfer
    # engine are GPU-only, so none of this runs on CPU.)

    def sleep(self) -> None:
        """Level 1: weights to host memory, KV cache freed, while the trainer computes."""
        self.llm.sleep(level=1)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """``["weights"]``, ``["kv_cache"]`` or everything (None)."""
        self.llm.wake_up(tags)

    def weight_transfer(self, method: str, payload: dict | None = None) -> None:
        """One control-plane call of vLLM's weight-transfer engine on the worker:
        ``init_weight_transfer_engine``, ``start_weight_update`` or ``update_weights``."""
        if method not in ("init_weight_transfer_engine", "start_weight_update", "update_weights"):
            raise ValueError(f"unknown weight-transfer call {method!r}")
        if method == "start_weight_update":
            self._weights_ok = False  # a mix of versions until finish_weight_update
        self.llm.collective_rpc(method, args=() if payload is None else (payload,))

    def finish_weight_update(self, version: int) -> None:
        """Close the IPC update: vLLM finalises the layerwise reload (re-running any
        weight processing), the prefix cache computed with the old weights is dropped,
        and the engine serves ``version``."""
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()
        self._weights_ok = True
        self.policy_version = version


class _Sample:
    """One request's tokens as the engine steps produce them (``RequestOutputKind.DELTA``)."""

    def __init__(self):
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.finish: str | None = None

    def add(self, output, version: int, finished: bool) -> None:
        new = [int(t) for t in output.token_ids]
        if new and (output.logprobs is None or len(output.logprobs) != len(new)):
            raise ModelError("vLLM returned no sampler log-prob for some tokens")
        self.token_ids += new
        self.logprobs += [float(step[t].logprob) for step, t in zip(output.logprobs or [], new)]
        self.versions += [version] * len(new)
        if finished:
            self.finish = output.finish_reason


class _WeightStream:
    """Checks each ``(name, tensor)`` against the checkpoint before vLLM sees it.

    On the first bad tensor it stops feeding vLLM (a mismatched tensor would
    otherwise fail deep inside its loader) and remembers the error; ``drain``
    then consumes the rest of the source iterator.
    """

    def __init__(self, weights: Iterable[tuple[str, torch.Tensor]],
                 expected: dict[str, tuple[int, ...]], tied: bool):
        self.source = iter(weights)
        self.expected = expected
        self.tied = tied
        self.seen: set[str] = set()
        self.error: str | None = None

    def fail(self, error: str) -> None:
        if self.error is None:
            self.error = error

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.source:
            if self.tied and name == "lm_head.weight":
                name = "model.embed_tokens.weight"  # vLLM's tied models skip lm_head.*
            if name not in self.expected:
                import difflib

                close = difflib.get_close_matches(name, self.expected.keys(), n=3)
                self.fail(f"unknown weight name {name!r}" + (f"; did you mean {close}?" if close else ""))
            elif tuple(tensor.shape) != self.expected[name]:
                self.fail(f"weight {name!r} has shape {tuple(tensor.shape)}, the model expects {self.expected[name]}")
            if self.error is not None:
                return
            if name in self.seen:
                continue  # the other half of a tied pair
            self.seen.add(name)
            yield name, tensor
        if not self.seen:
            self.fail("received no tensors")
        missing = sorted(set(self.expected) - self.seen)
        if missing:
            self.fail(f"{len(missing)} weights were not sent, e.g. {missing[:3]}")

    def drain(self) -> None:
        for _ in self.source:
            pass


def _vllm_params(params: SamplingParams, seed: int, n: int):
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VLLMSamplingParams(
        n=n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        max_tokens=params.max_new_tokens,
        stop=list(params.stop) or None,
        include_stop_str_in_output=True,
        seed=seed,
        logprobs=0,  # the sampled token's log-prob only
        output_kind=RequestOutputKind.DELTA,  # each step's new tokens (their policy version)
    )


def _check_params(params: SamplingParams) -> None:
    from rlpost.engines.hf_rollout import _check_params as check

    check(params)


def _checkpoint_shapes(model_path: str) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor in the folder's safetensors files (metadata only)."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_path!r} has no *.safetensors files; the vLLM engine needs a local "
                         f"safetensors checkpoint (save_pretrained writes one)")
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _tied_embeddings(model_path: str) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def _check_cpu_head_size(model_path: str) -> None:
    """Fail at construction, not at the first forward, on a head size vLLM's CPU
    attention has no kernel for (vLLM 0.32: 32, 64, 80, ... 512)."""
    if torch.cuda.is_available():
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head not in _CPU_HEAD_SIZES:
        raise ModelError(f"vLLM's CPU attention supports head sizes {list(_CPU_HEAD_SIZES)}; {model_path!r} "
                         f"has {head}. Use rollout.engine=hf for this model.")


def _repack_tied_lm_head(worker) -> None:
    """Rebuild the CPU GEMM of a tied LM head after an in-place reload (vLLM 0.32 bug).

    On CPU, vLLM prepacks every linear weight (``dispatch_cpu_unquantized_gemm``:
    oneDNN or sgl-kernel keep their own copy). A tied LM head shares its weight with
    the embedding but receives no tensors of its own, so ``reload_weights`` updates
    the shared weight and never repacks the head: logits keep coming from the old
    weights. Re-running the head's weight processing repacks it from the new values;
    it is idempotent. GPUs read the weight directly and are unaffected. Guarded to
    the versions ``pyproject.toml`` allows; test_vllm_rollout's tied-embedding test
    (log-probs against HF after an update) says whether a newer vLLM still needs it.
    """
    import vllm

    if not vllm.__version__.startswith("0.32.") or torch.cuda.is_available():
        return
    head = getattr(worker.model_runner.get_model(), "lm_head", None)
    if head is not None and hasattr(head, "cpu_linear"):
        head.quant_method.process_weights_after_loading(head)


def _restore_set_num_threads(original) -> None:
    """Undo vLLM's process-wide ``torch.set_num_threads`` patch.

    vLLM 0.32's CPU worker replaces ``torch.set_num_threads`` with a no-op that logs
    a warning (it assumes it owns a process whose threads it has pinned). In-process,
    that would silence every later caller in this process (the Ray actor, tests).
    In-process vLLM pins no threads, so the original function is safe to restore.
    """
    if torch.set_num_threads is not original:
        torch.set_num_threads = original


# vLLM 0.32's layerwise reload (model_executor/model_loader/reload/layerwise.py) logs
# "<Layer>: Failed to load weights" at WARNING on every in-place update for layers that
# received nothing, including layers with no weights of their own: rotary embeddings
# (buffers computed from the config) and, with tied embeddings, the LM head (its weight
# is the embedding's, sent once). For those the message is noise that reads like an
# error; for any other layer it is kept.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _WeightlessReloadFilter(logging.Filter):
    def __init__(self, tied_head: bool):
        super().__init__()
        self.tied_head = tied_head

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "%s: Failed to load weights" or not record.args:
            return True
        layer = str(record.args[0])
        weightless = "RotaryEmbedding" in layer or (self.tied_head and layer == "ParallelLMHead")
        return not weightless


def quiet_weightless_reload_warnings(tied_head: bool) -> None:
    """Drop vLLM's reload warning for layers without weights of their own (see above);
    once per process, whatever the number of engines."""
    logger = logging.getLogger(_RELOAD_LOGGER)
    for old in [f for f in logger.filters if isinstance(f, _WeightlessReloadFilter)]:
        logger.removeFilter(old)
    logger.addFilter(_WeightlessReloadFilter(tied_head))
