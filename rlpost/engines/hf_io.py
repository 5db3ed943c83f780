"""Loading an HF causal LM for training and writing one back: the parts of a training
engine that do not depend on how it shards (used by ``DeepSpeedEngine``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable

import torch

from rlpost.config.schema import ModelConfig
from rlpost.errors import ModelError

# Files an HF model folder may carry besides config and weights; export copies them.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def load_causal_lm(model_path: str, model_cfg: ModelConfig, dtype: torch.dtype,
                   gradient_checkpointing: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype,
                                                     trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load {model_path!r} with AutoModelForCausalLM: {e}") from e
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and with ZeRO-3's hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_value_model(model_path: str, model_cfg: ModelConfig, dtype: torch.dtype,
                     gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The base model of ``model_path`` with a scalar head (``*ForTokenClassification``,
    one label) instead of the LM head: a PPO critic, for either training engine. A head
    missing from the folder (a policy checkpoint) starts at zero, so every value starts
    at 0 instead of at noise; no dropout before it, so old and new values come from the
    same function."""
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    remote = model_cfg.trust_remote_code
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "score.* MISSING" load report is expected here
    try:
        config = AutoConfig.from_pretrained(model_path, num_labels=1, trust_remote_code=remote)
        config.classifier_dropout = 0.0  # HF's default for models without one is 0.1
        model, info = AutoModelForTokenClassification.from_pretrained(
            model_path, config=config, dtype=dtype, output_loading_info=True, trust_remote_code=remote)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load {model_path!r} as a value model (AutoModelForTokenClassification): {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info["missing_keys"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in missing:  # the fresh head (``score.*`` in Qwen2/Llama)
                param.zero_()
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def shared_parameter_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters registered under several names (tied
    embeddings: ``lm_head.weight`` -> ``model.embed_tokens.weight``)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def export_hf(weights: Iterable[tuple[str, torch.Tensor]], model: torch.nn.Module, aliases: dict[str, str],
              path: str, dtype: torch.dtype, tokenizer_path: str, write: bool) -> None:
    """Consume ``weights`` (every rank must: gathering may be collective); when
    ``write``, save config, ``model.safetensors`` and tokenizer files into ``path``."""
    from safetensors.torch import save_file

    tensors = {}
    for name, tensor in weights:
        # safetensors refuses shared storage; HF re-ties on load from the config.
        if write and name not in aliases:
            tensors[name] = tensor.to("cpu", copy=True).contiguous()
    if not write:
        return
    os.makedirs(path, exist_ok=True)
    config = model.config
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(path)
    config.use_cache = False
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_path, name)):
            shutil.copy2(os.path.join(tokenizer_path, name), os.path.join(path, name))
