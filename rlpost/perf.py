"""How close a step runs to the machine's limit: model FLOPs, the node's peak, MFU.

Model FLOPs of one training step (the "6N" rule of Kaplan et al. 2020, as PaLM's MFU
and prime-rl count them; attention's sequence-length term is left out, small at the
lengths RL post-training on a CPU runs):

    flops = 6 * N * trained_tokens          forward + backward of every trained row
          + 2 * N * generated_tokens         one forward per sampled token (KV cache)
          + 2 * N * extra_forward_tokens     no-grad passes: old log-probs, reference

``N`` counts the parameters a token's computation multiplies by: every parameter but
the input embedding table (a lookup, no FLOPs); the LM head counts, tied or not.
Tokens are real tokens (prompt and completion, no padding): work spent on padding is
not model FLOPs, so it lowers MFU. Prompt prefill during sampling is not counted.

MFU = flops / (step seconds * peak). The peak is the node's: for CPUs a short float32
matmul benchmark (one core's best rate times the cores, the best seen kept:
``peak_flops``); for GPUs
the datasheet's dense bf16 figure per GPU times the GPUs in use.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlpost.utils.files import write_atomic

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, by name fragment.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def step_flops(n_params: int, trained_tokens: float, generated_tokens: float,
               extra_forward_tokens: float = 0.0) -> float:
    """Model FLOPs of one step (module docstring)."""
    return 6.0 * n_params * trained_tokens + 2.0 * n_params * (generated_tokens + extra_forward_tokens)


def matmul_params(model_path: str, trust_remote_code: bool = False) -> int:
    """``N`` of the model folder: all parameters but the input embedding table (the
    LM head counts even when tied to it). Built on the meta device: no memory, no load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())  # a tied LM head is counted once here
    embedding = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return total if tied else total - embedding


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: without them a CPU emulates bf16 matmuls, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def measure_cpu_peak(cores: int, size: int = 512, seconds: float = 0.25) -> float:
    """The node's float32 matmul peak (FLOP/s): the best rate of one thread on
    ``size``-square matrices over about ``seconds``, times ``cores``.

    One thread and short matmuls (a few ms each), because the best of many of them
    finds time slices nobody else used even on a busy machine, where a timed
    all-core matmul measures the neighbours instead (seen: 22 GFLOP/s on two cores
    under a load of 16, against 99 for one thread). Matmul scales about linearly
    with cores (reference machine: 109 GFLOP/s on one, 235 on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)  # warm-up: thread pool and caches
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2.0 * size ** 3 / (time.perf_counter() - t0))
        return best * cores
    finally:
        torch.set_num_threads(before)


def peak_flops(cache_dir: Path | None, gpus: int = 0, gpu_name: str | None = None,
               cpu_peak: tuple[float, str] | None = None) -> tuple[float, str]:
    """(peak FLOP/s of the devices in use, how it was found). GPUs: datasheet x
    ``gpus`` for ``gpu_name`` (the cluster's accelerator type, e.g. "H100"); CPU, or a
    GPU not in the table: ``cpu_peak`` if given (measured earlier), else
    ``measure_cpu_peak_cached`` now."""
    if gpus > 0 and gpu_name:
        for fragment, peak in GPU_PEAK_BF16.items():
            if fragment in gpu_name:
                return peak * gpus, f"{gpus} x {gpu_name} datasheet bf16 {peak / 1e12:.0f} TFLOP/s"
    return cpu_peak or measure_cpu_peak_cached(cache_dir)


def measure_cpu_peak_cached(cache_dir: Path | None) -> tuple[float, str]:
    """``measure_cpu_peak`` (a quarter second), and the best rate ever seen on this
    CPU model and core count, kept in ``cache_dir/cpu_peak.json``: a start on a busy
    machine measures low, and must not lower the peak."""
    cpus = os.cpu_count() or 1
    key = f"{_cpu_model()}|{cpus}"
    path = cache_dir / "cpu_peak.json" if cache_dir else None
    cached = json.loads(path.read_text()) if path and path.exists() else {}
    measured = measure_cpu_peak(cpus)
    if measured > cached.get(key, 0.0):
        cached[key] = measured
        if path:
            write_atomic(path, json.dumps(cached, indent=1))  # several runs may start at once
    return cached[key], (f"{cpus} cores x fp32 matmul {cached[key] / cpus / 1e9:.0f} GFLOP/s = "
                         f"{cached[key] / 1e9:.0f} GFLOP/s, the best measured on this CPU "
                         f"({measured / 1e9:.0f} now; {path or 'not cached'})")


def matmul_params_cached(model_path: str, trust_remote_code: bool, cache_dir: Path | None) -> int:
    """``matmul_params``, kept in ``cache_dir/matmul_params.json`` by the content of
    the folder's config.json: building the meta model imports transformers' modeling
    code, about 1 s of CPU a start would otherwise spend again."""
    config = Path(model_path) / "config.json"
    if cache_dir is None or not config.is_file():
        return matmul_params(model_path, trust_remote_code)
    import hashlib

    key = hashlib.sha256(config.read_bytes()).hexdigest()[:32]
    path = cache_dir / "matmul_params.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = matmul_params(model_path, trust_remote_code)
        write_atomic(path, json.dumps(cached, indent=1))
    return int(cached[key])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


@dataclass(frozen=True)
class StepPerf:
    """Turns a step's token counts and time into ``perf/*`` metrics."""

    n_params: int  # N (``matmul_params``)
    peak: float  # FLOP/s of all devices in use (``peak_flops``)
    devices: int = 1  # GPUs in use; 1 for a CPU node

    def metrics(self, *, trained_tokens: float, generated_tokens: float, extra_forward_tokens: float,
                step_s: float) -> dict[str, float]:
        flops = step_flops(self.n_params, trained_tokens, generated_tokens, extra_forward_tokens)
        step_s = max(step_s, 1e-9)
        return {
            "perf/mfu": flops / (step_s * self.peak),
            "perf/tflops_per_step": flops / 1e12,
            # trained rows' tokens (prompt + completion) per second of the whole step
            "perf/tokens_per_s_per_device": trained_tokens / step_s / self.devices,
        }
