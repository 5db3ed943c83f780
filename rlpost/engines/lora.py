"""LoRA adapters through ``peft`` (``model.lora.*``): which tensors a LoRA engine trains,
and how it turns base weights plus adapters back into plain HF weights.

Used by both trainer backends (FSDP2 and DeepSpeed), for the policy only: the reference
stays the plain base model and a PPO critic trains fully. Only the adapters
(``lora_A``/``lora_B``) require grad, so the optimizer, its state and checkpoints hold
adapters only. The rollout engine and ``export_hf`` get merged
weights under the base model's HF names, ``W + (alpha / r) * B @ A``, so they never
see peft (the merge is computed per tensor; the module itself is never merged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlpost.config.schema import LoraConfig
from rlpost.errors import ConfigError

ADAPTER = "default"


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, gradient_checkpointing: bool) -> torch.nn.Module:
    """``model`` wrapped by peft with adapters on ``cfg.target_modules``; base frozen."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        wrapped = get_peft_model(model, peft_cfg)
    except ValueError as e:  # no module matched target_modules
        raise ConfigError(f"model.lora.target_modules: {e}") from e
    if gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad when the embedding is frozen.
        model.enable_input_require_grads()
    return wrapped


@dataclass(frozen=True)
class ExportedTensor:
    """One tensor of the plain HF state dict: ``base`` under ``name``, plus the LoRA
    layer whose delta is added to it (None for tensors without an adapter)."""

    name: str
    base: torch.Tensor
    layer: torch.nn.Module | None = None

    def adapter_params(self) -> list[torch.nn.Parameter]:
        if self.layer is None:
            return []
        return [self.layer.lora_A[ADAPTER].weight, self.layer.lora_B[ADAPTER].weight]

    def merged(self, base_value: torch.Tensor, a: torch.Tensor | None = None,
               b: torch.Tensor | None = None) -> torch.Tensor:
        """``base_value`` (the full base tensor) plus the adapter delta, in its dtype.
        ``a``/``b`` are the full ``lora_A``/``lora_B`` weights; by default the layer's own
        (call with them gathered)."""
        if self.layer is None:
            return base_value
        a = self.layer.lora_A[ADAPTER].weight.data if a is None else a
        b = self.layer.lora_B[ADAPTER].weight.data if b is None else b
        # peft's delta for a linear layer, (alpha / r) * B @ A, transposed for Conv1D-style
        # weights; computed here on plain tensors so sharded (DTensor) adapters can pass in.
        delta = (b.float() @ a.float()) * self.layer.scaling[ADAPTER]
        if self.layer.fan_in_fan_out:
            delta = delta.T
        return (base_value.float() + delta).to(base_value.dtype)


def export_plan(peft_model: torch.nn.Module) -> list[ExportedTensor]:
    """The tensors of the wrapped HF model's plain ``state_dict`` (same names and order),
    each with the LoRA layer to merge into it."""
    from peft.tuners.lora import LoraLayer

    hf_model = peft_model.get_base_model()
    layers = {name: m for name, m in hf_model.named_modules() if isinstance(m, LoraLayer)}
    plan = []
    for key, tensor in hf_model.state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            owner, leaf = key.split(".base_layer.")
            plan.append(ExportedTensor(f"{owner}.{leaf}", tensor, layers[owner] if leaf == "weight" else None))
        else:
            plan.append(ExportedTensor(key, tensor))
    return plan
