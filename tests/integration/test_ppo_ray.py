"""PPO through Ray: ``python -m rlpost.train +recipe=ppo_math`` with two FSDP2 ranks for
the policy and two for the critic (its own actors and process group), then a resume
that must restore the critic from the checkpoint; and a critic rank killed by pid
mid-run, after which the supervisor rebuilds policy and critic from the checkpoint."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

THIS_FILE = Path(__file__).resolve()


def always_one(prompt, completion, ground_truth, metadata):
    """Reward 1 for every completion: the critic then has a non-zero target from step 1
    (with the math reward, all 8 samples of a step often score 0 on the tiny model)."""
    return 1.0


SMALL = [
    "+recipe=ppo_math", f"reward.fn='{THIS_FILE}:always_one'",
    "data.train_batch_size=4", "rollout.n=2", "eval.size=8", "eval.every=2",
    "trainer.save_every=1", "trainer.world_size=2", "reward.workers=1", "ray.num_cpus=6",
]


def _train(args, cwd):
    return subprocess.run([sys.executable, "-m", "rlpost.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_ppo_two_ranks_through_ray_then_resume(tmp_path):
    out = tmp_path / "run"
    proc = _train([*SMALL, "trainer.total_steps=2", f"output_dir={out}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["critic/updates"] == 1.0 and row["critic/skipped"] == 0.0
        assert math.isfinite(row["critic/vf_loss"]) and math.isfinite(row["critic/explained_variance"])
        assert row["policy/updates"] == 1.0
    # The head starts at 0, so the first step's values are 0; the second's are not.
    assert rows[1]["critic/old_values_mean"] == 0.0 and rows[2]["critic/old_values_mean"] != 0.0
    critic_ckpt = out / "checkpoints" / "step_000002" / "critic"
    saved = torch.load(critic_ckpt / "model.pt", weights_only=True)
    assert {"score.weight", "score.bias"} <= saved.keys() and saved["score.weight"].abs().sum() > 0

    # Resume: step 3's pre-update values come from the restored critic, not a fresh
    # (all-zero) head.
    proc = _train([*SMALL, "trainer.total_steps=3", f"output_dir={out}", "resume=auto"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["critic/old_values_mean"] != 0.0


# 4 PPO steps of 2 prompts, checkpoint at step 2; one rank each for policy and critic.
KILL_ARGS = [
    "+recipe=ppo_math", f"reward.fn='{THIS_FILE}:always_one'", "rollout.engine=hf", "rollout.n=2",
    "rollout.max_new_tokens=16", "data.train_batch_size=2", "data.builtin_train_size=4", "trainer.total_steps=4",
    "trainer.save_every=2", "eval.every=0", "reward.workers=1", "ray.num_cpus=4", "logger=[jsonl]",
]
PPO_KEYS = ["reward/mean", "policy/loss", "policy/grad_norm", "critic/vf_loss", "critic/old_values_mean",
            "critic/explained_variance"]


@pytest.mark.integration
def test_critic_rank_killed_mid_run_is_rebuilt_from_the_checkpoint_and_matches(tmp_path):
    from test_fault_tolerance import Run, final_weights, metric_rows  # same machinery as the GRPO kills

    reference = Run(tmp_path / "reference", args=KILL_ARGS)
    assert reference.finish() == 0, reference.output[-4000:]
    want = metric_rows(tmp_path / "reference")
    # The critic learns step to step, so a rebuild that lost its checkpoint would not match.
    assert len({r["critic/old_values_mean"] for r in want}) == 4

    run = Run(tmp_path / "cut", args=KILL_ARGS)
    try:
        victim = run.pids("critic rank")[0]
        run.wait_until(lambda: any(r["step"] == 3 for r in metric_rows(run.out)), "step 3")
        os.kill(victim, signal.SIGKILL)  # step 4 is in flight; the checkpoint is step 2
    finally:
        rc = run.finish()
    assert rc == 0, run.output[-4000:]
    assert "trainer group lost" in run.output and "critic" in run.output.split("trainer group lost")[1][:300]
    assert victim not in run.pids("critic rank")
    got = metric_rows(run.out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["trainer/restarts"] for r in got] == [0, 0, 1, 1]
    assert [{k: r[k] for k in PPO_KEYS} for r in got] == [{k: r[k] for k in PPO_KEYS} for r in want]
    a, b = final_weights(run.out), final_weights(tmp_path / "reference")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
