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


# rollout.engine=auto on CPU: below this many parameters the HF engine sampled faster
# than vLLM on the reference 2-core CPU (0.6M and 24M Qwen2s; at 100M the two were
# even), so it is used even where vLLM is installed. Measured with
# scripts/bench_rollout.py, docs/performance.md "Rollout engines".
AUTO_VLLM_MIN_PARAMS_CPU = 100_000_000


def resolve_rollout_engine(name: str, model_path: str | None = None, gpu: bool | None = None) -> str:
    """The concrete engine for ``rollout.engine``; any name but ``auto`` is returned as is.

    ``auto`` is ``vllm`` when vLLM is importable and either the replicas have GPUs
    (``gpu``: from the placement, ``rlpost.train``; None: whether this process sees
    CUDA) or the model (``model_path``, a local folder) has at least
    ``AUTO_VLLM_MIN_PARAMS_CPU`` parameters; else ``hf``. The choice and its reason
    are logged once per process.
    """
    if name != "auto":
        return name
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    return _auto_engine(model_path, gpu)


def choose_auto_engine(vllm_installed: bool, gpu: bool, params: int | None) -> tuple[str, str]:
    """``(engine, reason)`` for ``rollout.engine=auto``. ``params`` is the model's
    parameter count, None when unknown (then vLLM, where installed)."""
    if not vllm_installed:
        return "hf", ("vLLM is not installed (GPU: pip install 'rlpost[vllm]'; "
                      "CPU: RLPOST_VLLM=1 bash scripts/setup.sh, see README)")
    if gpu:
        return "vllm", "vLLM is installed and a GPU is present"
    if params is None:
        return "vllm", "vLLM is installed (model size unknown)"
    size = f"{params / 1e6:.1f}M parameters"
    if params < AUTO_VLLM_MIN_PARAMS_CPU:
        return "hf", f"{size} on CPU, below the {AUTO_VLLM_MIN_PARAMS_CPU / 1e6:.0f}M where vLLM starts to win"
    return "vllm", f"{size} on CPU, at least the {AUTO_VLLM_MIN_PARAMS_CPU / 1e6:.0f}M where vLLM starts to win"


def count_parameters(model_path: str | None) -> int | None:
    """Elements in the ``*.safetensors`` files of a local model folder (headers only,
    nothing is loaded); None without such files."""
    from pathlib import Path

    files = sorted(Path(model_path).glob("*.safetensors")) if model_path else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                total += functools.reduce(lambda a, b: a * b, shape, 1)
    return total


@functools.cache  # one log line per process, model and device kind
def _auto_engine(model_path: str | None, gpu: bool) -> str:
    vllm = importlib.util.find_spec("vllm") is not None
    engine, reason = choose_auto_engine(vllm, gpu, count_parameters(model_path))
    (log.info if vllm else log.warning)(f"rollout.engine=auto: using {engine}: {reason}")
    return engine


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


def make_rollout_engine(cfg: RunConfig, model_path: str, seed: int, device: torch.device | str = "cpu",
                        num_threads: int | None = None):
    """The rollout engine named by ``cfg.rollout.engine``, on ``device`` (the one Ray
    assigned the actor; vLLM finds its GPU itself from CUDA_VISIBLE_DEVICES), computing
    with ``num_threads`` torch threads (None: whatever the process has; the actor
    decides, see docs/performance.md)."""
    engine = resolve_rollout_engine(cfg.rollout.engine, model_path)
    if engine == "hf":
        from rlpost.engines.hf_rollout import HFRolloutEngine

        return HFRolloutEngine(model_path, dtype=cfg.model.dtype, seed=seed, batch_size=cfg.rollout.batch_size,
                               device=device, num_threads=num_threads, inflight_kv=cfg.rollout.inflight_kv)
    if engine == "vllm":
        from rlpost.engines.vllm_rollout import VLLMRolloutEngine

        return VLLMRolloutEngine(model_path, dtype=cfg.model.dtype, seed=seed,
                                 max_model_len=cfg.context_tokens(),  # multi-turn: the whole episode's context
                                 kv_cache_gb=cfg.rollout.kv_cache_gb,
                                 gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                                 enforce_eager=cfg.rollout.enforce_eager,
                                 colocate=cfg.rollout.colocate, num_threads=num_threads,
                                 inflight_kv=cfg.rollout.inflight_kv)
    if engine == "fake":
        from rlpost.engines.fake import FakeRolloutEngine

        return FakeRolloutEngine(seed=seed)
    raise ValueError(f"unknown rollout engine {cfg.rollout.engine!r}")
