"""Colocated placement on a GPU (rollout.colocate=true): trainer rank and vLLM replica
share the device, vLLM sleeps while the trainer computes, weights pass by CUDA IPC.
GPU-only: skipped on machines without CUDA or without vLLM (CPU CI runs the
disaggregated path instead, tests/integration/test_train_e2e.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_colocated_grpo_steps_keep_vllm_and_trainer_logprobs_together(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    out = tmp_path / "run"
    args = ["+recipe=grpo_math", "rollout.engine=vllm", "rollout.colocate=true", "rollout.kv_cache_gb=0",
            "rollout.gpu_memory_utilization=0.3", "trainer.total_steps=3", "eval.every=0",
            "data.train_batch_size=4", "rollout.n=4", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "rlpost.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # Step s samples with version s - 1: steps 2 and 3 ran on weights that came by IPC.
    assert [r["rollout/policy_version"] for r in steps] == [0.0, 1.0, 2.0]
    # fp32 on both sides: after an IPC update vLLM scores the sampled tokens like the trainer.
    assert max(r["rollout/logprob_abs_diff_mean"] for r in steps) < 1e-3
