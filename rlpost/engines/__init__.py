"""Engines behind the interfaces in ``rlpost.engines.base``, chosen by config name."""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import TYPE_CHECKING

from rlpost.config.schema import RunConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def resolve_rollout_engine(name: str) -> str:
    """The concrete engine for ``rollout.engine``: ``auto`` is ``vllm`` when vLLM is
    importable here, else ``hf``; any other name is returned as is."""
    return _auto_engine() if name == "auto" else name


@functools.cache  # one log line per process
def _auto_engine() -> str:
    if importlib.util.find_spec("vllm") is not None:
        log.info("rollout.engine=auto: using vllm")
        return "vllm"
    log.warning("rollout.engine=auto: vLLM is not installed, falling back to the hf engine "
                "(GPU: pip install 'rlpost[vllm]'; CPU: RLPOST_VLLM=1 bash scripts/setup.sh, see README)")
    return "hf"


def make_train_engine(backend: str, model_path: str, model_cfg, trainer_cfg, **kwargs):
    """The training engine for ``trainer.backend`` (``fsdp2`` or ``deepspeed``); both
    implement ``rlpost.engines.base.TrainEngine``. ``kwargs`` go to the engine
    (``trainable``, ``seed``, ``logit_temperature``, ...). Needs torch.distributed up."""
    if backend == "fsdp2":
        from rlpost.engines.fsdp import FSDPEngine

        return FSDPEngine(model_path, model_cfg, trainer_cfg, **kwargs)
    if backend == "deepspeed":
        from rlpost.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model_path, model_cfg, trainer_cfg, **kwargs)
    raise ValueError(f"unknown trainer.backend {backend!r} (fsdp2 | deepspeed)")


def make_rollout_engine(cfg: RunConfig, model_path: str, seed: int, device: torch.device | str = "cpu"):
    """The rollout engine named by ``cfg.rollout.engine``, on ``device`` (the one Ray
    assigned the actor; vLLM finds its GPU itself from CUDA_VISIBLE_DEVICES)."""
    engine = resolve_rollout_engine(cfg.rollout.engine)
    if engine == "hf":
        from rlpost.engines.hf_rollout import HFRolloutEngine

        return HFRolloutEngine(model_path, dtype=cfg.model.dtype, seed=seed, batch_size=cfg.rollout.batch_size,
                               device=device)
    if engine == "vllm":
        from rlpost.engines.vllm_rollout import VLLMRolloutEngine

        return VLLMRolloutEngine(model_path, dtype=cfg.model.dtype, seed=seed,
                                 max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                                 kv_cache_gb=cfg.rollout.kv_cache_gb,
                                 gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                                 enforce_eager=cfg.rollout.enforce_eager,
                                 colocate=cfg.rollout.colocate)
    if engine == "fake":
        from rlpost.engines.fake import FakeRolloutEngine

        return FakeRolloutEngine(seed=seed)
    raise ValueError(f"unknown rollout engine {cfg.rollout.engine!r}")
