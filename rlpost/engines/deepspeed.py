"""DeepSpeed ZeRO training engine (``trainer.backend=deepspeed``): one data-parallel
rank, with the same contract as ``rlpost.engines.fsdp.FSDPEngine``.

Runs inside a process whose default ``torch.distributed`` group already exists (gloo
on CPU, nccl on GPU); DeepSpeed wraps it (``dist_init_required=False``). On a host
without CUDA, ``DS_ACCELERATOR=cpu`` is set before deepspeed is imported. Every
public method except ``named_weight_shapes`` is collective.

Where DeepSpeed's defaults differ from the engine contract, and what is done:
- DeepSpeed AVERAGES gradients over ranks; the LossFn contract wants a SUM (losses are
  already divided by the global token count). Each backward scales the loss by the
  world size, so the average DeepSpeed computes is the sum.
- DeepSpeed divides the loss by ``gradient_accumulation_steps`` and steps every that
  many backwards. Here the number of micro-batches varies per step, so the config
  says 1, every backward passes ``scale_wrt_gas=False``, and the boundary is set by
  hand: only the last micro-batch's backward is a boundary, then one ``step()``.
- A non-finite loss must skip the step on every rank even if its gradient were
  finite. Ranks agree on "bad" before the last backward, and a bad step backpropagates
  ``loss * nan``, so DeepSpeed's own overflow check drops the gradients and does not
  step; the lr schedule (kept here, not in DeepSpeed) then does not advance either.
- Gradient clipping and the global norm are DeepSpeed's (``gradient_clipping``), the
  same formula as torch's ``clip_grad_norm_``: scale by ``clip / (norm + 1e-6)``.
- The optimizer is torch's AdamW with the same hyper-parameters as FSDP (a "client
  optimizer"); with ``trainer.offload_optimizer`` its state lives on the CPU.

Precision: ``model.dtype=bfloat16`` trains with DeepSpeed's bf16 mode: bf16 compute
weights, float32 master weights and optimizer state, float32 gradient reduction.

Checkpoints: full float32 master weights (``model.pt``) and AdamW state keyed by HF
parameter name (``optimizer.pt``; with LoRA, adapters only), the layout ``FSDPEngine`` writes, gathered with
DeepSpeed's ``safe_get_full_*`` helpers and scattered back with ``safe_set_full_*``;
nothing depends on the world size or ZeRO stage.

The frozen reference (``trainable=False``) is a plain replicated module: DeepSpeed
shards only what an optimizer holds, and ZeRO-3 inference sharding is not wired.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from rlpost.config.schema import ModelConfig, TrainerConfig
from rlpost.engines import hf_io, lora, microbatch, prefix
from rlpost.engines.base import LossFn
from rlpost.engines.fsdp import MODEL_FILE, OPTIMIZER_FILE, lr_factor, sequence_values
from rlpost.errors import ConfigError, ModelError
from rlpost.types import ModelOutput, TrainBatch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed asserts LOCAL_RANK is set (its launcher sets it). Each rank here owns one
    # device (Ray hands every trainer actor its own GPU), so it is 0 unless told.
    os.environ.setdefault("LOCAL_RANK", "0")
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - deepspeed is a dependency
        raise ConfigError("trainer.backend=deepspeed: deepspeed is not installed (pip install deepspeed)") from e
    return deepspeed


def _drop_stale_world_group() -> None:
    """Patch (deepspeed 0.19.x): ``deepspeed.utils.groups`` caches a clone of the world
    group for the life of the process. A process that destroys its default group and
    makes a new one (tests, a rebuilt group) would hand DeepSpeed the dead clone
    ("Group ... is not registered"); forget it so DeepSpeed clones the live group."""
    from deepspeed.utils import groups

    cached = getattr(groups, "_WORLD_GROUP", None)
    if cached is not None and cached not in dist.distributed_c10d._world.pg_group_ranks:
        groups._WORLD_GROUP = None


def deepspeed_config(cfg: TrainerConfig, bf16: bool) -> dict:
    """The DeepSpeed config dict for ``trainer.*`` (see module docstring for why)."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,  # DeepSpeed never sees our batches
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # keep torch AdamW even with offload
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """Implements ``rlpost.engines.base.TrainEngine`` with DeepSpeed ZeRO 1/2/3."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, trainer_cfg: TrainerConfig | None,
                 trainable: bool = True, seed: int = 0, logit_temperature: float = 1.0, head: str = "lm") -> None:
        if head not in ("lm", "value"):
            raise ValueError(f"head must be 'lm' (policy/reference) or 'value' (critic), got {head!r}")
        self.head = head
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedEngine needs torch.distributed initialised first (gloo on CPU, nccl on GPU)")
        if trainable and trainer_cfg is None:
            raise ConfigError("trainer: a trainable DeepSpeedEngine needs a TrainerConfig (only the frozen reference may omit it)")
        self.model_cfg, self.trainer_cfg, self.trainable = model_cfg, trainer_cfg, trainable
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        self.model_path = model_path
        self.dtype = _DTYPES[model_cfg.dtype]
        self.opts = microbatch.ForwardOptions(
            logit_temperature=logit_temperature if logit_temperature > 0 else 1.0,
            packing=bool(trainer_cfg and trainer_cfg.packing) and head == "lm",  # a critic runs padded rows
            logprob_chunk_tokens=trainer_cfg.logprob_chunk_tokens if trainer_cfg else 0,
            share_prompt=False)  # decided once the model is loaded (prefix.enabled)
        torch.manual_seed(seed)
        load = hf_io.load_value_model if head == "value" else hf_io.load_causal_lm
        model = load(model_path, model_cfg, torch.float32 if trainable else self.dtype,
                     gradient_checkpointing=trainable and model_cfg.gradient_checkpointing)
        if trainer_cfg is not None and head == "lm":
            self.opts = dataclasses.replace(self.opts, share_prompt=prefix.enabled(
                trainer_cfg.share_prompt, self.device, trainer_cfg.packing,
                trainable and model_cfg.gradient_checkpointing, model.config))
        self._aliases = hf_io.shared_parameter_aliases(model)
        self.engine = self.optimizer = self.scheduler = None
        if not trainable:
            self.model = model.to(self.device).requires_grad_(False).eval()
            self._export = [lora.ExportedTensor(n, t) for n, t in self.model.state_dict(keep_vars=True).items()]
            return
        self.lora = head == "lm" and model_cfg.lora.rank > 0
        if self.lora:  # the reference (frozen) and a critic stay plain, as in FSDPEngine
            model = lora.apply_lora(model, model_cfg.lora, model_cfg.gradient_checkpointing)
        deepspeed = _import_deepspeed()
        _drop_stale_world_group()
        cfg = trainer_cfg
        # AdamW with exactly FSDPEngine's hyper-parameters; DeepSpeed wraps it.
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=deepspeed_config(cfg, self.dtype == torch.bfloat16),
            dist_init_required=False)
        self.model = self.engine.module
        # keep_vars: ZeRO-3 parameters are empty placeholders; the Parameter objects
        # carry the full shape (ds_shape) and can be gathered.
        self._export = (lora.export_plan(self.model) if self.lora else
                        [lora.ExportedTensor(n, t) for n, t in self.model.state_dict(keep_vars=True).items()])
        total = cfg.total_steps * cfg.mini_batches * cfg.epochs
        # Built after initialize: ZeRO replaced the groups' params with its partitions
        # but kept the dicts, so the schedule drives the lr ZeRO's step reads.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total, cfg.lr_schedule))

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage() if self.engine is not None else 0

    # -------------------------------------------------------------- forward
    def _micro_batches(self, batch: TrainBatch, size: int) -> list[microbatch.MicroBatch | None]:
        cfg = self.trainer_cfg
        max_tokens = cfg.max_tokens_per_microbatch if cfg else 0
        parts = microbatch.split(batch, size, max_tokens, self.opts.packing, self.opts.share_prompt) if batch.size else []
        return microbatch.pad_count(parts, self.device)

    def _forward(self, mb: TrainBatch, with_entropy: bool) -> ModelOutput:
        if self.head == "value":
            mask = mb.attention_mask
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # right padding, as microbatch.forward
            head_out = (self.engine or self.model)(input_ids=mb.input_ids, attention_mask=mask,
                                                   position_ids=position_ids, use_cache=False).logits
            return ModelOutput(logprobs=None, values=sequence_values(head_out, mask))
        return microbatch.forward(self.engine or self.model, mb, self.opts, with_entropy)

    def _dummy_loss(self) -> torch.Tensor:
        """A zero loss over a dummy forward: keeps collectives in step, adds no gradient."""
        out = self._forward(microbatch.dummy_batch(self.device), with_entropy=False)
        return (out.values if self.head == "value" else out.logprobs).sum() * 0.0

    @torch.no_grad()
    def forward_logprobs(self, batch: TrainBatch, *, with_entropy: bool = False,
                         micro_batch_size: int | None = None) -> ModelOutput:
        """[B, T] float32 log-probs (and entropy) on CPU, no gradient. Collective."""
        size = micro_batch_size or (self.trainer_cfg.micro_batch_size if self.trainer_cfg else max(batch.size, 1))
        self.model.eval()
        logprobs, entropy = [], []
        for mb in self._micro_batches(batch, size):
            if mb is None:
                self._forward(microbatch.dummy_batch(self.device), with_entropy=False)
                continue
            out = self._forward(microbatch.to_device(mb.batch, self.device), with_entropy)
            logprobs.append((mb.rows, out.logprobs))
            if with_entropy:
                entropy.append((mb.rows, out.entropy))
        shape = tuple(batch.input_ids.shape)
        return ModelOutput(logprobs=microbatch.scatter_rows(logprobs, shape),
                           entropy=microbatch.scatter_rows(entropy, shape) if with_entropy else None)

    @torch.no_grad()
    def forward_values(self, batch: TrainBatch, *, micro_batch_size: int | None = None) -> ModelOutput:
        """Value model only: ``ModelOutput.values`` [B, T] float32 on CPU, no gradient.
        Collective. ``micro_batch_size`` defaults to ``trainer.micro_batch_size``."""
        if self.head != "value":
            raise RuntimeError("forward_values needs a DeepSpeedEngine built with head='value'")
        size = micro_batch_size or self.trainer_cfg.micro_batch_size
        self.model.eval()
        values = []
        for mb in self._micro_batches(batch, size):
            if mb is None:
                self._forward(microbatch.dummy_batch(self.device), with_entropy=False)
                continue
            values.append((mb.rows, self._forward(microbatch.to_device(mb.batch, self.device), False).values))
        return ModelOutput(logprobs=None, values=microbatch.scatter_rows(values, tuple(batch.input_ids.shape)))

    # ---------------------------------------------------------------- train
    def train_step(self, batch: TrainBatch, loss_fn: LossFn, micro_batch_size: int, *,
                   return_logprobs: bool = False):
        """One optimizer step over this rank's shard; see TrainEngine.train_step and
        the module docstring for how DeepSpeed is made to keep that contract.
        ``return_logprobs``: ``(metrics, the training forward's detached log-probs)``."""
        if self.engine is None:
            raise RuntimeError("train_step called on a frozen (trainable=False) DeepSpeedEngine")
        self.engine.train()
        metrics: dict[str, float] = {}
        bad = torch.zeros((), device=self.device)
        mbs = self._micro_batches(batch, micro_batch_size)
        lr = self.optimizer.param_groups[0]["lr"]
        seen = []  # (rows, detached log-probs) per micro-batch, for return_logprobs
        for i, mb in enumerate(mbs):
            last = i == len(mbs) - 1
            self.engine.set_gradient_accumulation_boundary(last)
            if mb is None:  # keeps the collectives in step; contributes zero gradient
                loss = self._dummy_loss()
            else:
                data = microbatch.to_device(mb.batch, self.device)
                out = self._forward(data, with_entropy=True)
                if return_logprobs:
                    seen.append((mb.rows, out.logprobs.detach()))
                loss, mb_metrics = loss_fn(out, data)
                bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
                for key, value in mb_metrics.items():
                    metrics[key] = metrics.get(key, 0.0) + float(value)
            if last:
                if self.world_size > 1:
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                if bad.item():  # poison: DeepSpeed's overflow check then skips the step
                    loss = loss * float("nan")
            # x world size: DeepSpeed averages over ranks, the contract sums.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float("inf") if grad_norm is None else float(grad_norm)
        skipped = bool(bad.item()) or not torch.isfinite(torch.tensor(grad_norm)).item()
        if not skipped:
            self.scheduler.step()
        metrics.update(grad_norm=grad_norm, lr=lr, skipped=float(skipped))
        if return_logprobs:
            return metrics, microbatch.scatter_rows(seen, tuple(batch.input_ids.shape))
        return metrics

    # -------------------------------------------------------------- weights
    def named_weight_shapes(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(HF name, full shape, dtype) of what ``named_full_weights`` yields. Local."""
        return [(e.name, tuple(getattr(e.base, "ds_shape", e.base.shape)),
                 self.dtype if e.base.is_floating_point() else e.base.dtype) for e in self._export]

    @contextlib.contextmanager
    def _gathered(self, tensors: list[torch.Tensor]):
        partitioned = [t for t in tensors if hasattr(t, "ds_id")]
        if partitioned:  # ZeRO-3 partitioned parameters: all-gather them
            import deepspeed

            with deepspeed.zero.GatheredParameters(partitioned):
                yield
        else:
            yield

    def named_full_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors in HF naming and ``model.dtype``, one at a time. Collective:
        every rank must exhaust the iterator (ZeRO-3 gathers each parameter). With LoRA,
        the base model's tensors with the adapters merged in (``rlpost.engines.lora``)."""
        for entry in self._export:
            with self._gathered([entry.base, *entry.adapter_params()]):
                full = entry.merged(entry.base.data.detach())
                value = full.to(self.dtype, copy=True) if full.is_floating_point() else full.clone()
            yield entry.name, value

    # ---------------------------------------------------------- checkpoints
    def _trainable_named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _adam_step(self) -> torch.Tensor | None:
        """AdamW's step count (same on every partition), None before the first step."""
        for state in self.optimizer.state.values():
            if "step" in state:
                return state["step"]
        return None

    def save(self, path: str) -> None:
        """Full float32 master weights and AdamW state (``FSDPEngine``'s layout), written
        by rank 0. Collective; returns on every rank after the write."""
        if self.engine is None:
            raise RuntimeError("save called on a frozen DeepSpeedEngine")
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        step = self._adam_step()
        model_sd, state = {}, {}
        for name, param in self._trainable_named_params():
            model_sd[name] = safe_get_full_fp32_param(param).detach().cpu().clone()
            if step is not None:
                state[name] = {"step": step.detach().cpu().clone(),
                               **{k: safe_get_full_optimizer_state(param, k).detach().cpu().clone() for k in _ADAM_KEYS}}
        for alias, source in self._aliases.items():  # tied names, as HF's state_dict has them
            if source in model_sd:  # (LoRA: only adapters are saved)
                model_sd[alias] = model_sd[source]
        if self.rank == 0:
            group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
            group["params"] = [n for n, _ in self._trainable_named_params()]
            os.makedirs(path, exist_ok=True)
            torch.save(model_sd, os.path.join(path, MODEL_FILE))
            torch.save({"optimizer": {"state": state, "param_groups": [group]},
                        "scheduler": self.scheduler.state_dict(), "world_size": self.world_size},
                       os.path.join(path, OPTIMIZER_FILE))
        dist.barrier()

    def load(self, path: str) -> None:
        """Inverse of ``save`` (or of ``FSDPEngine.save``), from any world size and
        ZeRO stage. Every rank reads the files. A missing or unreadable checkpoint
        raises ``ModelError`` on every rank."""
        if self.engine is None:
            raise RuntimeError("load called on a frozen DeepSpeedEngine")
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        error = None
        try:
            model_sd = torch.load(os.path.join(path, MODEL_FILE), map_location="cpu", weights_only=True, mmap=True)
            state = torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError) as e:
            error = f"{path!r} is not a readable checkpoint ({MODEL_FILE}, {OPTIMIZER_FILE}): {e}"
        flag = torch.tensor([float(error is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a rank that cannot read stops them all
        if flag.item():
            raise ModelError(error or f"{path!r}: another rank could not read this checkpoint")
        optim_state = state["optimizer"]["state"]
        if optim_state and self._adam_step() is None:
            self._materialise_optimizer_state()
        for name, param in self._trainable_named_params():
            value = model_sd[name].to(self.device)
            safe_set_full_fp32_param(param, value)
            with self._gathered_for_write(param):
                param.data.copy_(value.to(param.dtype))  # the compute copy ZeRO keeps apart
            for key in _ADAM_KEYS if name in optim_state else ():
                safe_set_full_optimizer_state(param, optim_state[name][key].to(self.device), key)
        if optim_state:
            step = next(iter(optim_state.values()))["step"]
            for s in self.optimizer.state.values():
                s["step"] = step.clone().to(s["step"].device)
        self.scheduler.load_state_dict(state["scheduler"])
        # lr, betas, ... as saved: the scheduler's state alone does not set the groups' lr.
        for saved, group in zip(state["optimizer"]["param_groups"], self.optimizer.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params" and k in group})
        dist.barrier()

    @contextlib.contextmanager
    def _gathered_for_write(self, param: torch.nn.Parameter):
        if hasattr(param, "ds_id"):
            import deepspeed

            # modifier_rank: rank 0's write is broadcast and re-partitioned on exit
            # (None would drop it). Every rank wrote the same value anyway.
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                yield
        else:
            yield

    def _materialise_optimizer_state(self) -> None:
        """AdamW creates its state lazily at the first step; ``safe_set_full_*`` needs
        it. One step with zero gradients at lr 0 creates it without moving a weight
        (AdamW at lr 0 leaves weights, decay included, unchanged); the caller then
        overwrites the moments and the step count."""
        saved = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        self.engine.set_gradient_accumulation_boundary(True)
        loss = self._dummy_loss()
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()
        for g, lr in zip(self.optimizer.param_groups, saved):
            g["lr"] = lr

    def export_hf(self, path: str, tokenizer_path: str | None = None) -> None:
        """Rank 0 writes an HF folder (config, ``model.safetensors`` in ``model.dtype``,
        tokenizer files). Collective."""
        hf_io.export_hf(self.named_full_weights(), self.model, self._aliases, path, self.dtype,
                        tokenizer_path or self.model_path, write=self.rank == 0)
        dist.barrier()
