"""``trainer.mode=one_step_off`` through Ray (``python -m rlpost.train``): the rollout
replica samples step t+1 while the trainer actor trains step t, and the checkpoint
records the batch sampled ahead."""

import json
import os
import pickle
import subprocess
import sys

import pytest

SMALL = [
    "+recipe=grpo_math", "data.train_batch_size=4", "rollout.n=2", "eval.every=0", "reward.workers=1",
    "ray.num_cpus=4", "trainer.total_steps=3", "trainer.save_every=2", "trainer.mode=one_step_off",
    "algorithm.tis_cap=2",
]


@pytest.mark.integration
def test_one_step_off_through_ray(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rlpost.train", *SMALL, f"output_dir={out}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Batch k is sampled by version max(k - 2, 0); the update of step k starts from version k - 1.
    assert [r["rollout/policy_version"] for r in rows] == [0, 0, 1]
    assert [r["async/staleness_max"] for r in rows] == [0, 1, 1]
    assert all("policy/tis_ratio_mean" in r and r["timing/idle_s"] >= 0 for r in rows)
    # The step-2 checkpoint holds batch 3, sampled by version 1 while step 2 trained.
    step2 = out / "checkpoints" / "step_000002"
    state = json.loads((step2 / "controller.json").read_text())["overlap"]
    assert state["buffered"] == 1 and state["produced"] == 3
    [batch] = pickle.loads((step2 / "rollout_buffer.pkl").read_bytes())
    assert (batch.index, batch.policy_version) == (3, 1)
    assert {t.completion.policy_version for t in batch.collected.trajectories} == {1}


@pytest.mark.integration
@pytest.mark.parametrize("kv", ["recompute"])
def test_async_inflight_updates_through_ray_then_resume(tmp_path, kv):
    """The replica's receive_weights runs while its generate does (a Ray concurrency
    group); three steps, a checkpoint at step 2 holding what was sampled ahead, then a
    resume to step 4 that trains it first."""
    out = tmp_path / "run"
    args = [a for a in SMALL if not a.startswith("trainer.mode=")] + [
        "trainer.mode=async", "trainer.inflight_updates=true", "trainer.max_staleness=2",
        f"rollout.inflight_kv={kv}", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "rlpost.train", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        shares = r["async/token_lag_0"] + r["async/token_lag_1"] + r["async/token_lag_2plus"]
        assert abs(shares - 1.0) < 1e-9 and r["async/version_oldest"] <= r["async/version_newest"]
        assert r["async/staleness_max"] <= 2 and r["async/dropped_batches"] == 0
    step2 = out / "checkpoints" / "step_000002"
    state = json.loads((step2 / "controller.json").read_text())["overlap"]
    batches = pickle.loads((step2 / "rollout_buffer.pkl").read_bytes())
    # Every batch sampled by the save is trained (2) or in the checkpoint; none half-sampled.
    assert state["produced"] == 2 + state["buffered"] == 2 + len(batches)
    for b in batches:
        assert b.policy_version == min(t.completion.policy_version for t in b.collected.trajectories)

    resumed = subprocess.run([sys.executable, "-m", "rlpost.train", *args, "trainer.total_steps=4", "resume=auto"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
