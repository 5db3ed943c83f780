"""Multi-turn episodes through Ray: the env pool's actors isolate crashes and hangs, the
built-in environments reach the real sandbox service from an env actor, and the
grpo_math_tool and grpo_terminal recipes run 2 steps with `python -m rlpost.train`
against the real sandbox service (the tool model calls tools; which ones is up to the
model; the terminal recipe's episodes each live in a sandbox session)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_a_dying_env_actor_fails_only_its_episodes_and_comes_back(ray_cluster):
    from rlpost.config.schema import EnvConfig
    from rlpost.envs import EnvFailure, StepResult, Task
    from rlpost.faults import FaultCounts
    from rlpost.workers.env_pool import EnvPool

    faults = FaultCounts()
    pool = EnvPool(EnvConfig(workers=2, timeout_s=5.0), "rlpost.envs.fake:FakeEnv", {"turns": 1}, faults)
    tasks = [Task(uid=f"t{i}", question="q", answer="7", metadata={"fake_fail": "die"} if i == 0 else {})
             for i in range(4)]
    assert all(not isinstance(o, EnvFailure) for o in pool.reset([(t.uid, t) for t in tasks]))
    # Round robin: t0 and t2 live on actor 0, which t0 kills; t1 and t3 on actor 1.
    results = pool.step([(t.uid, "7") for t in tasks])
    assert isinstance(results[0], EnvFailure) and "lost env actor 0" in results[0].error
    assert isinstance(results[2], EnvFailure)
    assert faults.counts["env/actor_failures"] == 1  # one lost call, logged with the step's metrics
    assert results[1] == StepResult([], 1.0, True) and results[3] == StepResult([], 1.0, True)
    # Ray restarts the actor; new episodes on it run (a reset waits for the restart).
    # The first try may still meet the dying instance; a later one must succeed.
    again = Task(uid="t4", question="q", answer="7")
    for attempt in range(3):
        opened = pool.reset([(f"e{attempt}a", again), (f"e{attempt}b", again)])
        stepped = pool.step([(f"e{attempt}a", "7"), (f"e{attempt}b", "no")])
        if not any(isinstance(o, EnvFailure) for o in [*opened, *stepped]):
            break
    assert stepped == [StepResult([], 1.0, True), StepResult([], 0.0, True)]
    pool.shutdown()


def test_a_hanging_env_fails_only_its_episode_on_ray(ray_cluster):
    from rlpost.config.schema import EnvConfig
    from rlpost.envs import EnvFailure, StepResult, Task
    from rlpost.workers.env_pool import EnvPool

    pool = EnvPool(EnvConfig(workers=1, timeout_s=2.0), "rlpost.envs.fake:FakeEnv", {"turns": 1})
    tasks = [Task(uid=f"t{i}", question="q", answer="7", metadata={"fake_fail": "hang"} if i == 0 else {})
             for i in range(3)]
    pool.reset([(t.uid, t) for t in tasks])
    # All three share the one actor: the hung call times out inside it, the others answer.
    results = pool.step([(t.uid, "7") for t in tasks])
    assert isinstance(results[0], EnvFailure) and results[0].error == "step timed out after 2 s"
    assert results[1:] == [StepResult([], 1.0, True)] * 2
    pool.shutdown()


def test_env_actors_run_python_and_unit_tests_in_the_real_sandbox(ray_cluster, sandbox_url):
    """The built-in environments' sandbox paths, from a Ray env actor to the service."""
    from rlpost.config.schema import EnvConfig
    from rlpost.envs import Task
    from rlpost.workers.env_pool import EnvPool

    math_pool = EnvPool(EnvConfig(workers=1, timeout_s=30.0), f"{REPO / 'environments' / 'math_tool.py'}:MathToolEnv",
                        {"sandbox_url": sandbox_url})
    task = Task(uid="m", question="What is 6 * 7?", answer="42")
    math_pool.reset([("m", task)])
    call = '<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>'
    (result,) = math_pool.step([("m", call)])
    assert not result.done and result.info["tool_calls"] == 1
    assert result.observation[0]["role"] == "tool" and "42" in result.observation[0]["content"]
    math_pool.shutdown()

    code_pool = EnvPool(EnvConfig(workers=1, timeout_s=30.0), f"{REPO / 'environments' / 'code.py'}:CodeEnv",
                        {"sandbox_url": sandbox_url})
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    tasks = [Task(uid=f"c{i}", question="Write add(a, b).", answer="tests", metadata={"tests": tests}) for i in range(2)]
    code_pool.reset([(t.uid, t) for t in tasks])
    right, wrong = code_pool.step([("c0", "```python\ndef add(a, b):\n    return a + b\n```"),
                                   ("c1", "```python\ndef add(a, b):\n    return a - b\n```")])
    assert right.done and right.reward == {"accuracy": 1.0}
    assert not wrong.done and wrong.reward == {"accuracy": 0.0} and "AssertionError" in wrong.observation[0]["content"]
    code_pool.shutdown()


def test_grpo_math_tool_two_steps_through_ray_with_the_sandbox(tmp_path, sandbox_url):
    out = tmp_path / "run"
    args = ["+recipe=grpo_math_tool", "trainer.total_steps=2", "data.train_batch_size=4", "rollout.n=4",
            "eval.size=8", "eval.every=2", "trainer.save_every=0", "reward.workers=1", "env.workers=2",
            "ray.num_cpus=6", f"env.fn={REPO / 'environments' / 'math_tool.py'}:MathToolEnv",
            f"env.kwargs.sandbox_url={sandbox_url}", f"output_dir={out}"]
    # From an unrelated directory: the env file is loaded by absolute path in the actors.
    proc = subprocess.run([sys.executable, "-m", "rlpost.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/accuracy" in rows[0] and "eval/turns_mean" in rows[2]
    for row in rows[1:]:
        assert row["env/episodes"] == 16 and row["env/episodes_failed"] == 0
        assert row["env/tool_calls_mean"] > 0  # the tool model called tools
        assert row["env/observation_tokens_mean"] > 0 and row["policy/skipped"] == 0.0
        assert row["rollout/policy_version"] == row["step"] - 1
    samples = (out / "samples.jsonl").read_text()
    assert "<tool_response>" in samples


def test_grpo_terminal_two_steps_through_ray_with_sessions(tmp_path, sandbox_url):
    """The terminal recipe end to end: every episode opens a sandbox session with its
    repository from an env actor, checks the test there, and deletes it at the end. (The
    tiny model was never taught this task, so the reward is 0: what is checked is the
    plumbing.)"""
    out = tmp_path / "run"
    env_file = REPO / "environments" / "fix_test.py"
    args = ["+recipe=grpo_terminal", "trainer.total_steps=2", "data.train_batch_size=4", "rollout.n=4",
            "eval.size=4", "eval.every=2", "trainer.save_every=0", "reward.workers=1", "env.workers=2",
            "ray.num_cpus=6", f"env.fn={env_file}:FixTestEnv", f"data.generator={env_file}:make_rows",
            f"env.kwargs.sandbox_url={sandbox_url}", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "rlpost.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["env/episodes"] == 16 and row["env/episodes_failed"] == 0
        assert row["policy/skipped"] == 0.0 and row["rollout/policy_version"] == row["step"] - 1
    assert rows[0]["eval/episodes_failed"] == 0 and rows[0]["eval/num_prompts"] == 4
    # 2 steps x 16 episodes + 2 evals x 4, each in a session of its own, all deleted.
    import time
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 10  # the last closes are fire-and-forget
    while True:
        with urllib.request.urlopen(sandbox_url + "/metrics", timeout=10) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        events = {s.labels["event"]: s.value for s in families["rlpost_sandbox_sessions"].samples}
        live = families["rlpost_sandbox_live_sessions"].samples[0].value
        if live == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert live == 0 and events["created"] == events["deleted"] >= 40 and events["reaped"] == 0, events
