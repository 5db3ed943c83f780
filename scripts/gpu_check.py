"""GPU acceptance check (run through ``scripts/gpu_check.sh``; under 8 minutes on one GPU host).

    scripts/gpu_check.sh                      # hub model if reachable, else a local 0.5B Qwen2
    scripts/gpu_check.sh --model /path/to/hf  # any local folder or hub id
    python scripts/gpu_check.py --tiny --build-only   # CPU smoke: builds a tiny model, prints its path

What it runs, each a real ``python -m rlpost.train`` with vLLM on a local Ray cluster:
1. colocated: trainer rank and vLLM replica share GPU 0 (``rollout.colocate=true``,
   weights by CUDA IPC);
2. disaggregated, when two GPUs exist: trainer on one GPU, the replica on the other
   (weights over the NCCL sync group).
Then the CUDA tests of ``tests/integration/test_gpu_paths.py``.

The model: ``--model`` (default Qwen/Qwen2.5-0.5B-Instruct) when the hub answers;
otherwise a Qwen2-architecture model with Qwen2.5-0.5B's shapes (about 0.49B
parameters) and random weights, built locally with a small BPE tokenizer. Random
weights make speed and the log-prob gap meaningful, not rewards.

Prints one JSON line: per configuration, generated tokens/s per GPU (rollout GPUs),
weight-sync seconds and GB/s (bf16 parameter bytes / sync time, median over steps
after the first), the trainer/vLLM log-prob gap (mean |trainer - sampler| per token),
and the peak GPU memory seen by ``nvidia-smi`` while it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2.5-0.5B's shapes (its config.json): 24 layers, 896 wide, 14 heads / 2 KV heads.
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="hub id or local folder")
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per configuration")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    p.add_argument("--tiny", action="store_true", help="build a tiny Qwen2 instead of the 0.5B one (smoke tests)")
    p.add_argument("--build-only", action="store_true", help="only resolve/build the model and print its path")
    p.add_argument("--skip-tests", action="store_true", help="do not run tests/integration/test_gpu_paths.py")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first sync is a warm-up)")
    return args


def hub_reachable(model: str) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(model, timeout=10)
        return True
    except Exception:
        return False


def build_qwen2(out: Path, tiny: bool) -> Path:
    """A Qwen2ForCausalLM with random bf16 weights and a BPE tokenizer trained on the
    built-in math problems (token ids all < the model's vocabulary)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from rlpost.data.math_gen import MAX_LEVEL, generate_problems, solution_text
    from rlpost.models.tiny import train_tokenizer

    if (out / "config.json").exists():
        return out
    problems = generate_problems(2000, MAX_LEVEL, 0, "tokenizer", heldout=False)
    tokenizer = train_tokenizer([f"system\nuser\n{p.question}\nassistant\n{solution_text(p)}" for p in problems], 400)
    shapes = TINY if tiny else QWEN2_05B
    config = Qwen2Config(**shapes, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def param_count(model_dir: str) -> int:
    """Parameters in a local folder's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                numel = 1
                for dim in f.get_slice(name).get_shape():
                    numel *= dim
                total += numel
    return total


class PeakGpuMemory:
    """Polls ``nvidia-smi`` (all processes, every GPU) and keeps the largest total MiB."""

    def __init__(self, period_s: float = 0.5):
        self.peak_mib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(period_s,), daemon=True)

    def _poll(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max(self.peak_mib, max((int(x) for x in out.split()), default=0))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def train_command(model: str, out: Path, steps: int, colocate: bool) -> list[str]:
    return [sys.executable, "-m", "rlpost.train", "+recipe=grpo_math", f"model.path={model}",
            "model.dtype=bfloat16", "rollout.engine=vllm", f"rollout.colocate={str(colocate).lower()}",
            "rollout.kv_cache_gb=0", "rollout.gpu_memory_utilization=0.35", "rollout.max_new_tokens=256",
            "rollout.n=8", "data.train_batch_size=32", "trainer.micro_batch_size=8", f"trainer.total_steps={steps}",
            "trainer.save_every=0", "eval.every=0", "reward.workers=2", "algorithm.kl_coef=0",
            "trainer.world_size=1", "rollout.replicas=1", f"output_dir={out}", "resume=never"]


def run_config(name: str, model: str, out: Path, steps: int, colocate: bool, params: int, gpus: int) -> dict:
    cmd = train_command(model, out / name, steps, colocate)
    print(f"gpu_check: {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.time()
    with PeakGpuMemory() as mem:
        # Two configurations, the model build and the tests share gpu_check.sh's 8 minutes.
        try:
            proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=210)
        except subprocess.TimeoutExpired as err:
            return {"ok": False, "error": f"timed out after 210 s: {(err.stderr or '')[-1500:]}"}
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-1500:]}
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:]  # step 1 includes compilation and first-touch allocation
    sync_s = statistics.median(r["timing/weight_sync_s"] for r in later)
    return {
        "ok": True,
        "gpus": gpus,
        "generated_tokens_per_s_per_gpu": round(statistics.median(r["rollout/tokens_per_s"] for r in later) / gpus, 1),
        "weight_sync_s": round(sync_s, 4),
        "weight_sync_gb_per_s": round(params * 2 / 1e9 / max(sync_s, 1e-9), 2),  # bf16 bytes
        "logprob_gap_mean": statistics.mean(r["rollout/logprob_abs_diff_mean"] for r in rows),
        "logprob_gap_max": max(r["rollout/logprob_abs_diff_max"] for r in rows),
        "peak_gpu_memory_gib": round(mem.peak_mib / 1024, 2),
        "wall_s": round(time.time() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model
    source = "local" if Path(model).exists() else "hub" if hub_reachable(model) else "local-random"
    if source == "local-random":
        model = str(build_qwen2(args.out / ("qwen2-tiny-random" if args.tiny else "qwen2-0.5b-random"), args.tiny))
    if args.build_only:
        print(json.dumps({"model": model, "source": source}))
        return 0

    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        print("gpu_check: no CUDA GPU visible (torch.cuda.device_count() == 0)", file=sys.stderr)
        return 1
    local = model if Path(model).exists() else _download(model)
    params = param_count(local)
    result = {"model": args.model if source != "local-random" else "qwen2-0.5b-random", "source": source,
              "params": params, "gpu": torch.cuda.get_device_name(0), "gpus": gpus,
              "torch": torch.__version__, "steps": args.steps}
    result["colocated"] = run_config("colocated", local, args.out, args.steps, colocate=True, params=params, gpus=1)
    if gpus >= 2:
        result["disaggregated"] = run_config("disaggregated", local, args.out, args.steps, colocate=False,
                                             params=params, gpus=1)
    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/integration/test_gpu_paths.py"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
        result["gpu_tests"] = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-500:]
        result["gpu_tests_ok"] = tests.returncode == 0
    print(json.dumps(result))
    ok = all(result[k]["ok"] for k in ("colocated", "disaggregated") if k in result)
    return 0 if ok and result.get("gpu_tests_ok", True) else 1


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt"])


if __name__ == "__main__":
    sys.exit(main())
