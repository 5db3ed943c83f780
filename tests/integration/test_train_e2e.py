"""The real thing, small: `python -m rlpost.train` through Ray with the built-in tiny
model, FSDP2 trainer, HF rollout engine and reward pool; then a resume."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTRACT_KEYS = [
    "step", "reward/mean", "timing/step_s", "timing/rollout_s", "timing/train_s",
    "timing/weight_sync_s", "rollout/tokens_per_s", "policy/kl", "policy/entropy",
    "policy/clip_frac", "policy/grad_norm",
]
SMALL = [
    "+recipe=grpo_math", "data.train_batch_size=4", "rollout.n=2", "eval.size=8",
    "eval.every=2", "trainer.save_every=1", "reward.workers=1", "ray.num_cpus=4",
]


def _train(args, cwd, env=None):
    proc = subprocess.run([sys.executable, "-m", "rlpost.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})
    return proc


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_two_steps_through_ray_then_resume(tmp_path):
    out = tmp_path / "run"
    # Run from an unrelated directory: configs and recipes must be found from the package.
    proc = _train([*SMALL, "trainer.total_steps=2", f"output_dir={out}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert (out / "config.yaml").is_file()
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2]
    for row in rows[1:]:
        missing = [k for k in CONTRACT_KEYS if k not in row]
        assert not missing, missing
        assert math.isfinite(row["policy/grad_norm"]) and row["policy/skipped"] == 0.0
        assert 0.0 <= row["reward/mean"] <= 1.0
        assert row["rollout/policy_version"] == row["step"] - 1
        # Model FLOPs over the node's measured peak: a fraction, never above it.
        assert 0.0 < row["perf/mfu"] < 1.0 and row["perf/tokens_per_s_per_device"] > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")

    # Resume: continues at step 3 and writes each step once.
    proc = _train([*SMALL, "trainer.total_steps=3", f"output_dir={out}", "resume=auto"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2, 3]


def test_config_typo_fails_before_anything_starts(tmp_path):
    proc = _train(["+recipe=grpo_math", "trainer.totl_steps=5", f"output_dir={tmp_path / 'x'}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "trainer.total_steps" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.integration
def test_sigterm_checkpoints_then_resume_matches_an_uninterrupted_run(tmp_path):
    import signal
    import time

    args = [*SMALL, "trainer.total_steps=3", "trainer.save_every=0", "eval.every=0"]
    whole = tmp_path / "whole"
    proc = _train([*args, f"output_dir={whole}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cut = tmp_path / "cut"
    child = subprocess.Popen([sys.executable, "-m", "rlpost.train", *args, f"output_dir={cut}"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # config.yaml is written after the stop handlers are installed and before the
        # first step, so the signal always lands before the last step: the run finishes
        # the step in flight (at least one), checkpoints and exits 75. Waiting for
        # metrics.jsonl instead let a fast machine finish all three steps first.
        deadline = time.time() + 300
        while time.time() < deadline and not (cut / "config.yaml").exists():
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)  # by pid: the run we started
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 75, err[-3000:]
    stopped_at = int((cut / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 1 <= stopped_at < 3

    proc = _train([*args, f"output_dir={cut}", "resume=auto"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = ["reward/mean", "policy/loss", "policy/grad_norm", "policy/kl", "response/length_mean"]
    a, b = _metrics(whole), _metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, ra["step"]
