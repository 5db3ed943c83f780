"""FSDP2 training engine: one data-parallel rank of a policy or reference model.

Runs inside a process whose default ``torch.distributed`` group is already
initialised (gloo on CPU, nccl on GPU); world size 1 works too. Every public method
except ``named_weight_shapes`` is collective: all ranks call it together, in the same order,
or the group hangs.

Sharding: ``fully_shard`` on every decoder layer (``model._no_split_modules``) and on
the root, over a 1-D mesh of the whole default group. Tied parameters (embedding and
``lm_head``) both live in the root unit, so tying survives sharding.

Gradients are SUMMED over ranks, not averaged (``set_gradient_divide_factor(1.0)``
plus sum reduction): the ``LossFn`` contract in ``rlpost.engines.base`` already divides
by a global token count, so averaging would shrink every update by the world size.

Precision: with ``model.dtype = bfloat16`` a trainable engine keeps float32 master
weights and AdamW state and computes in bfloat16 (FSDP2 ``MixedPrecisionPolicy``,
gradients reduced in float32), as torchtitan and verl do; AdamW updates on bfloat16
weights lose most small updates. A frozen reference engine holds bfloat16 weights.
Weights leave the engine (``named_full_weights``, ``export_hf``) in ``model.dtype``.
log-softmax and entropy are always computed in float32.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from rlpost.config.schema import ModelConfig, TrainerConfig
from rlpost.engines import hf_io, lora, microbatch, prefix
from rlpost.engines.base import LossFn
from rlpost.errors import ConfigError, ModelError
from rlpost.types import ModelOutput, TrainBatch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter. Collective for a DTensor
    on several ranks. On one rank the local shard is the whole tensor: ``to_local()``
    returns the same storage ``full_tensor()`` would, without its redistribute
    dispatch (0.2-0.4 ms a tensor on CPU, 14-30 ms per weight sync of a 57M Qwen2,
    on the sender's critical path)."""
    if not isinstance(tensor, DTensor):
        return tensor
    if tensor.device_mesh.size() == 1:
        local = tensor.to_local()
        if local.shape == tensor.shape:
            return local
    return tensor.full_tensor()


def sequence_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_entropy: bool
) -> ModelOutput:
    """Per-token log-probs (and entropy) aligned with ``input_ids`` (see rlpost.types).

    logits: [B, T, V] from a forward over input_ids. ``out.logprobs[:, t]`` is
    ``log p(input_ids[:, t] | input_ids[:, :t])``, i.e. uses ``logits[:, t - 1]``;
    position 0 and padding are 0. Computed in float32, differentiable.
    """
    logits = logits[:, :-1].float()  # [B, T-1, V] predicts input_ids[:, 1:]
    lse = torch.logsumexp(logits, dim=-1)
    token_logits = logits.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    valid = attention_mask[:, 1:].to(logits.dtype)
    first = logits.new_zeros(input_ids.shape[0], 1)
    logprobs = torch.cat([first, (token_logits - lse) * valid], dim=1)
    entropy = None
    if with_entropy:
        # H = logsumexp(z) - sum_v softmax(z)_v z_v
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        entropy = torch.cat([first, ent * valid], dim=1)
    return ModelOutput(logprobs=logprobs, entropy=entropy)


def sequence_values(head_out: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token values aligned like ``sequence_logprobs`` (see rlpost.types).

    head_out: [B, T, 1], a scalar per position from a forward over input_ids.
    ``values[:, t] = head_out[:, t - 1]``: the value of the state that has seen
    ``input_ids[:, :t]``, before token t is generated. Position 0 and padding are 0.
    Float32, differentiable.
    """
    scores = head_out[:, :-1, 0].float() * attention_mask[:, 1:].float()
    return torch.cat([scores.new_zeros(scores.shape[0], 1), scores], dim=1)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    Linear warmup reaches 1.0 at step ``warmup_steps - 1`` (so the first step already
    moves the weights, unlike the HF schedule that starts at 0); then constant, or
    cosine decay to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class FSDPEngine:
    """Implements ``rlpost.engines.base.TrainEngine`` with FSDP2.

    ``model``, ``optimizer`` (None when frozen) and ``scheduler`` are public for
    inspection in tests; code outside the engine should not step them.
    """

    def __init__(
        self,
        model_path: str,
        model_cfg: ModelConfig,
        trainer_cfg: TrainerConfig | None,
        trainable: bool = True,
        seed: int = 0,
        logit_temperature: float = 1.0,
        head: str = "lm",
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("FSDPEngine needs torch.distributed initialised first (gloo on CPU, nccl on GPU)")
        if trainable and trainer_cfg is None:
            raise ConfigError("trainer: a trainable FSDPEngine needs a TrainerConfig (only the frozen reference may omit it)")
        if model_cfg.dtype not in _DTYPES:
            raise ConfigError(f"model.dtype: must be one of {sorted(_DTYPES)}, got {model_cfg.dtype!r}")
        if head not in ("lm", "value"):
            raise ValueError(f"head must be 'lm' (policy/reference) or 'value' (critic), got {head!r}")
        self.head = head
        self.model_cfg, self.trainer_cfg, self.trainable = model_cfg, trainer_cfg, trainable
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        self.model_path = model_path
        # Logits are divided by the sampling temperature so that the trainer scores
        # tokens under the distribution the rollout engine drew them from; otherwise
        # the PPO ratio is biased at any temperature but 1. (top-p/top-k truncation is
        # not replayed: the ratio uses the full tempered softmax, as verl does.)
        self.logit_temperature = logit_temperature if logit_temperature > 0 else 1.0
        # Packing, chunked log-softmax and shared prompts (rlpost.engines.microbatch),
        # policy/reference only.
        self._forward_opts = microbatch.ForwardOptions(
            self.logit_temperature, packing=bool(trainer_cfg and trainer_cfg.packing),
            logprob_chunk_tokens=trainer_cfg.logprob_chunk_tokens if trainer_cfg else 0,
            share_prompt=False)  # decided once the model is loaded (prefix.enabled)
        self.dtype = _DTYPES[model_cfg.dtype]  # dtype weights leave the engine in
        # bf16 training keeps fp32 master weights; see module docstring.
        master_dtype = torch.float32 if trainable else self.dtype
        torch.manual_seed(seed)
        self.model = self._load(model_path, master_dtype)
        if trainer_cfg is not None and head == "lm":
            self._forward_opts = dataclasses.replace(self._forward_opts, share_prompt=prefix.enabled(
                trainer_cfg.share_prompt, self.device, trainer_cfg.packing,
                self.trainable and model_cfg.gradient_checkpointing, self.model.config))
        # name -> name of the first parameter it shares storage with (tied embeddings).
        self._aliases = hf_io.shared_parameter_aliases(self.model)
        # LoRA (model.lora.rank > 0) on the trainable policy only; see rlpost.engines.lora.
        self.lora = trainable and head == "lm" and model_cfg.lora.rank > 0
        if self.lora:
            self.model = lora.apply_lora(self.model, model_cfg.lora, model_cfg.gradient_checkpointing)
        self._shard(mixed=trainable and self.dtype != torch.float32)
        # Built after sharding: keep_vars then holds the DTensor parameters FSDP2 installed.
        self._export = lora.export_plan(self.model) if self.lora else None

        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        if trainable:
            self._build_optimizer(trainer_cfg)
        else:
            self.model.requires_grad_(False)
            self.model.eval()

    # ------------------------------------------------------------------ setup
    def _load(self, model_path: str, dtype: torch.dtype) -> torch.nn.Module:
        if self.head == "value":
            return self._load_value_model(model_path, dtype)
        return hf_io.load_causal_lm(model_path, self.model_cfg, dtype,
                                    gradient_checkpointing=self.trainable and self.model_cfg.gradient_checkpointing)

    def _load_value_model(self, model_path: str, dtype: torch.dtype) -> torch.nn.Module:
        return hf_io.load_value_model(model_path, self.model_cfg, dtype,
                                      gradient_checkpointing=self.trainable and self.model_cfg.gradient_checkpointing)

    def _shard(self, mixed: bool) -> None:
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
        block_names = set(getattr(self.model, "_no_split_modules", None) or ())
        blocks = [m for m in self.model.modules() if type(m).__name__ in block_names]
        if not blocks:
            raise ModelError(f"{type(self.model).__name__} names no decoder layer class in _no_split_modules; cannot shard it per layer")
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(self.model, mesh=mesh, mp_policy=mp)
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                # SUM over ranks (see module docstring). Forcing sum reduction keeps
                # gloo working: a divide factor alone would ask for PREMUL_SUM.
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)

    def _build_optimizer(self, cfg: TrainerConfig) -> None:
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],  # LoRA: the adapters only
            lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
        )
        total = cfg.total_steps * cfg.mini_batches * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total, cfg.lr_schedule)
        )

    # -------------------------------------------------------------- forward
    def _to_device(self, batch: TrainBatch) -> TrainBatch:
        moved = {
            f.name: getattr(batch, f.name).to(self.device, non_blocking=True)
            for f in dataclasses.fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor)
        }
        return dataclasses.replace(batch, **moved)

    def _forward(self, mb: TrainBatch, with_entropy: bool) -> ModelOutput:
        opts = self._forward_opts
        if self.head == "lm" and (opts.packing or opts.logprob_chunk_tokens or opts.share_prompt):
            return microbatch.forward(self.model, mb, self._forward_opts, with_entropy)
        mask = mb.attention_mask
        # Right padding: real tokens sit at 0..len-1; pads get clamped positions.
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=mb.input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        if self.head == "value":
            return ModelOutput(logprobs=None, values=sequence_values(logits, mask))
        if self.logit_temperature != 1.0:
            logits = logits / self.logit_temperature
        return sequence_logprobs(logits, mb.input_ids, mask, with_entropy)

    def _train_micro_batches(self, batch: TrainBatch, size: int) -> list[microbatch.MicroBatch | None]:
        """Micro-batches for train_step: ``size`` rows, or a token budget
        (``trainer.max_tokens_per_microbatch``), each trimmed to its longest row; the
        row order does not matter to a summed loss, so they need not stay in order
        (``MicroBatch.rows`` says where each row came from)."""
        cfg = self.trainer_cfg
        parts = (microbatch.split(batch, size, cfg.max_tokens_per_microbatch, cfg.packing, self._forward_opts.share_prompt)
                 if batch.size else [])
        return microbatch.pad_count(parts, self.device)

    def _one_rank_accumulation(self, step_running: bool, more: bool) -> None:
        """One rank (world size 1): during a train step the parameters stay gathered from
        the first forward to the last backward, and gradients are reduced once, after the
        last micro-batch, as DDP-style accumulation does. With nothing to shard across,
        each layer's re-gather in backward and reduce-scatter per micro-batch are copies
        whose hooks cost about a fifth of a small model's step on CPU; skipping them holds
        one gathered copy of the parameters (each forward's all-gather made it anyway)
        for the step. Wider groups keep sharding: there the same switch would hold every
        rank's full parameters and gradients."""
        if self.world_size != 1:
            return
        self.model.set_reshard_after_forward(not step_running)
        self.model.set_reshard_after_backward(not more)
        self.model.set_requires_gradient_sync(not more)

    def _micro_batches(self, batch: TrainBatch, size: int) -> list[TrainBatch | None]:
        """Chunks of ``batch``, padded with ``None`` (a dummy forward) up to the largest
        count on any rank: FSDP all-gathers per forward, so ranks must run equally many."""
        chunks = batch.chunks(size) if batch.size else []
        count = len(chunks)
        if self.world_size > 1:
            t = torch.tensor([count], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            count = int(t.item())
        return chunks + [None] * (count - len(chunks))

    def _dummy_batch(self) -> TrainBatch:
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        return TrainBatch(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=torch.zeros(1, 2, device=self.device))

    @torch.no_grad()
    def forward_logprobs(
        self, batch: TrainBatch, *, with_entropy: bool = False, micro_batch_size: int | None = None
    ) -> ModelOutput:
        """[B, T] float32 log-probs (and entropy) on CPU, no gradient. Collective.

        ``micro_batch_size`` defaults to ``trainer.micro_batch_size`` (the whole batch
        for a reference engine built without a TrainerConfig).
        """
        size = micro_batch_size or (self.trainer_cfg.micro_batch_size if self.trainer_cfg else max(batch.size, 1))
        self.model.eval()
        logprobs, entropy = [], []
        for mb in self._micro_batches(batch, size):
            if mb is None:
                self._forward(self._dummy_batch(), with_entropy=False)
                continue
            out = self._forward(self._to_device(mb), with_entropy)
            logprobs.append(out.logprobs.cpu())
            if with_entropy:
                entropy.append(out.entropy.cpu())
        if not logprobs:
            empty = torch.zeros(tuple(batch.input_ids.shape), dtype=torch.float32)
            return ModelOutput(logprobs=empty, entropy=empty.clone() if with_entropy else None)
        return ModelOutput(
            logprobs=torch.cat(logprobs), entropy=torch.cat(entropy) if with_entropy else None
        )

    @torch.no_grad()
    def forward_values(self, batch: TrainBatch, *, micro_batch_size: int | None = None) -> ModelOutput:
        """Value model only: ``ModelOutput.values`` [B, T] float32 on CPU, no gradient.
        Collective. ``micro_batch_size`` defaults to ``trainer.micro_batch_size``."""
        if self.head != "value":
            raise RuntimeError("forward_values needs an FSDPEngine built with head='value'")
        size = micro_batch_size or self.trainer_cfg.micro_batch_size
        self.model.eval()
        values = []
        for mb in self._micro_batches(batch, size):
            if mb is None:
                self._forward(self._dummy_batch(), with_entropy=False)
                continue
            values.append(self._forward(self._to_device(mb), with_entropy=False).values.cpu())
        # FSDP2 keeps the root's parameters unsharded after a forward without backward;
        # reshard so that load() (which expects sharded DTensors) works after this call.
        self.model.reshard()
        return ModelOutput(logprobs=None, values=torch.cat(values) if values
                           else torch.zeros(tuple(batch.input_ids.shape), dtype=torch.float32))

    # ---------------------------------------------------------------- train
    def train_step(self, batch: TrainBatch, loss_fn: LossFn, micro_batch_size: int, *,
                   return_logprobs: bool = False):
        """One optimizer step over this rank's shard; see TrainEngine.train_step.

        A non-finite loss on any rank, or a non-finite global grad norm, skips the
        update on every rank (gradients dropped, no optimizer or scheduler step) and
        reports ``skipped = 1.0``; otherwise ``skipped = 0.0``. ``lr`` is the rate this
        step used (or would have used). ``return_logprobs``: also the training
        forward's log-probs, detached ([B, T] float32 CPU): ``(metrics, logprobs)``.
        """
        if self.optimizer is None:
            raise RuntimeError("train_step called on a frozen (trainable=False) FSDPEngine")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        bad_loss = torch.zeros((), device=self.device)
        seen = []  # (rows, detached log-probs) per micro-batch, for return_logprobs
        parts = self._train_micro_batches(batch, micro_batch_size)
        try:
            for i, part in enumerate(parts):
                self._one_rank_accumulation(step_running=True, more=i < len(parts) - 1)
                if part is None:  # keeps FSDP collectives in step; contributes zero gradient
                    out = self._forward(self._dummy_batch(), with_entropy=False)
                    (out.values if self.head == "value" else out.logprobs).sum().mul(0.0).backward()
                    continue
                mb = self._to_device(part.batch)
                out = self._forward(mb, with_entropy=True)
                if return_logprobs:
                    seen.append((part.rows, out.logprobs.detach()))
                loss, mb_metrics = loss_fn(out, mb)
                # Backward even when the loss is bad: FSDP reduce-scatters in backward and
                # the other ranks are waiting for it.
                loss.backward()
                bad_loss = torch.maximum(bad_loss, (~torch.isfinite(loss.detach())).float())
                for key, value in mb_metrics.items():
                    metrics[key] = metrics.get(key, 0.0) + float(value)
        finally:  # a failed step leaves no rank-1 accumulation switch on
            self._one_rank_accumulation(step_running=False, more=False)
        grad_norm = self._global_grad_norm()
        if self.world_size > 1:
            dist.all_reduce(bad_loss, op=dist.ReduceOp.MAX)
        skipped = bool(bad_loss.item()) or not math.isfinite(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            params = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, self.trainer_cfg.grad_clip, torch.tensor(grad_norm, device=self.device))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        metrics.update(grad_norm=grad_norm, lr=lr, skipped=float(skipped))
        if return_logprobs:
            return metrics, microbatch.scatter_rows(seen, tuple(batch.input_ids.shape))
        return metrics

    def _global_grad_norm(self) -> float:
        """L2 norm of the full (unsharded) gradient; identical on every rank."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):  # partial per-shard norms -> all-reduce
            norm = norm.full_tensor()
        return float(norm.item())

    # -------------------------------------------------------------- weights
    def named_weight_shapes(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(HF name, full shape, dtype) of what ``named_full_weights`` yields, in order.
        Local, not collective: what a weight-sync plan is built from."""
        named = ([(e.name, e.base) for e in self._export] if self.lora else self.model.state_dict().items())
        return [(name, tuple(t.shape), self.dtype if t.is_floating_point() else t.dtype) for name, t in named]

    def named_full_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors in HF naming and ``model.dtype``, one at a time (each is freed
        when its consumer drops it; the weight-sync sender keeps up to three alive while
        it pipelines broadcasts). Collective: every rank must exhaust the iterator; only
        rank 0's tensors are meant to be used (all ranks get the same values).

        Yields exactly the keys the plain HF model's ``state_dict()`` has, tied
        ``lm_head.weight`` included (re-gathered, not cached, to keep the peak low).
        With LoRA: the base model's names, adapters merged in (``rlpost.engines.lora``).
        """
        if self.lora:
            for entry in self._export:
                value = entry.merged(*[_full(t.detach()) for t in (entry.base, *entry.adapter_params())])
                yield entry.name, value.to(self.dtype) if value.is_floating_point() else value
            return
        for name, tensor in self.model.state_dict().items():
            tensor = _full(tensor)
            yield name, tensor.detach().to(self.dtype) if tensor.is_floating_point() else tensor.detach()

    # ---------------------------------------------------------- checkpoints
    def save(self, path: str) -> None:
        """Full (world-size independent) model, optimizer and scheduler state, written
        by rank 0 into ``path``. Collective; returns on every rank after the write."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if self.optimizer is not None:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
        else:
            model_sd, optim_sd = get_model_state_dict(self.model, options=options), None
        if self.lora:  # the frozen base is model_path's: adapters only
            adapters = self._trainable_names()
            model_sd = {k: v for k, v in model_sd.items() if k in adapters}
        if self.rank == 0:
            os.makedirs(path, exist_ok=True)
            torch.save(model_sd, os.path.join(path, MODEL_FILE))
            if optim_sd is not None:
                state = {"optimizer": optim_sd, "scheduler": self.scheduler.state_dict(), "world_size": self.world_size}
                torch.save(state, os.path.join(path, OPTIMIZER_FILE))
        del model_sd, optim_sd
        dist.barrier()

    def load(self, path: str) -> None:
        """Inverse of ``save``, from any world size: rank 0 reads, then broadcasts.
        A missing or unreadable checkpoint raises ``ModelError`` on every rank."""
        model_sd, state, error = {}, {}, None
        if self.rank == 0:
            try:
                model_sd = torch.load(os.path.join(path, MODEL_FILE), map_location="cpu", weights_only=True, mmap=True)
                if self.optimizer is not None:
                    state = torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu", weights_only=True, mmap=True)
            except (OSError, RuntimeError) as e:
                error = f"{path!r} is not a readable FSDPEngine checkpoint ({MODEL_FILE}, {OPTIMIZER_FILE}): {e}"
        box = [error]  # rank 0 alone read the files; the other ranks must not wait for it
        dist.broadcast_object_list(box, src=0, device=self._object_device)
        if box[0] is not None:
            raise ModelError(box[0])
        # LoRA checkpoints hold the adapters only; the base keeps the weights it loaded.
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not self.lora)
        # Model and optimizer separately: torch 2.13's set_state_dict treats an empty
        # model dict (what ranks > 0 pass with broadcast_from_rank0) as "optimizer
        # only", skips the model broadcast there and desynchronises the group.
        loaded = set_model_state_dict(self.model, model_sd, options=options)
        if self.lora:
            wrong = sorted(self._trainable_names() & set(loaded.missing_keys)) + sorted(loaded.unexpected_keys)
            if wrong:  # same answer on every rank: the key list was broadcast
                raise ModelError(f"{path!r} does not hold this run's LoRA adapters (model.lora.*): "
                                 f"{len(wrong)} keys differ, e.g. {wrong[:3]}")
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state.get("optimizer", {}), options=options)
            box = [state.get("scheduler")]
            dist.broadcast_object_list(box, src=0, device=self._object_device)
            self.scheduler.load_state_dict(box[0])
        dist.barrier()

    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.model.named_parameters() if p.requires_grad}

    @property
    def _object_device(self) -> torch.device | None:
        # NCCL moves pickled objects through the GPU; gloo through the CPU.
        return self.device if self.device.type == "cuda" else None

    def export_hf(self, path: str, tokenizer_path: str | None = None) -> None:
        """Rank 0 writes an HF folder (config, ``model.safetensors`` in ``model.dtype``,
        tokenizer files copied from ``tokenizer_path``, default the source model folder).
        Collective. Gathers the whole model on rank 0's CPU."""
        hf_io.export_hf(self.named_full_weights(), self.model, self._aliases, path, self.dtype,
                        tokenizer_path or self.model_path, write=self.rank == 0)
        dist.barrier()
