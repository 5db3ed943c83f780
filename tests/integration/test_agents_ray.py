"""The grpo_agent_openai recipe through Ray: `python -m rlpost.train` starts the
gateway in front of the rollout group, the example agent (environments/math_agent.py,
openai client only) runs in agent actors against its sessions and calls the real
sandbox's python tool (when the model asks for it) through tool_calls; 2 steps with
tiny shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_an_agent_that_kills_its_actor_fails_only_the_episodes_there(ray_cluster):
    """Two agent actors; the agent on actor 1 kills its process. Actor 0's episode
    finishes; actor 1's fails with a message, and Ray brings actor 1 back for later ones."""
    import time

    from rlpost.config.schema import EnvConfig
    from rlpost.envs.agent import AgentResult
    from rlpost.envs.base import EnvFailure
    from rlpost.faults import FaultCounts
    from rlpost.gateway import GatewayServer
    from rlpost.models.loading import load_tokenizer, resolve_model_path
    from rlpost.workers.agent_pool import AgentPool
    from test_agents import ScriptedGroup

    tokenizer = load_tokenizer(resolve_model_path("builtin:tiny-math-tool"))
    faults = FaultCounts()
    pool = AgentPool(EnvConfig(agent=f"{Path(__file__).parent / 'agent_examples.py'}:crashes_on_crash",
                               workers=2, timeout_s=30.0), faults)

    def row(uid):
        return {"uid": uid, "question": "q", "answer": "1", "metadata": {},
                "messages": [{"role": "user", "content": "What is 1 + 0?"}]}

    with GatewayServer(ScriptedGroup(tokenizer), tokenizer) as gw:
        items = [("e0", gw.new_session()[1], row("fine")), ("e1", gw.new_session()[1], row("crash"))]
        ok, lost = pool.run(items)
        assert ok == AgentResult(1.0)
        assert isinstance(lost, EnvFailure) and "lost agent actor 1" in lost.error
        assert faults.counts["env/actor_failures"] == 1
        deadline = time.monotonic() + 60  # Ray restarts the dead actor
        while True:
            again = pool.run([("e2", gw.new_session()[1], row("a")), ("e3", gw.new_session()[1], row("b"))])
            if again == [AgentResult(1.0)] * 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert again == [AgentResult(1.0)] * 2
    pool.shutdown()


def test_grpo_agent_openai_two_steps_through_ray(tmp_path, sandbox_url):
    out = tmp_path / "run"
    args = ["+recipe=grpo_agent_openai", "trainer.total_steps=2", "data.train_batch_size=2", "rollout.n=4",
            "eval.size=4", "eval.every=2", "trainer.save_every=0", "reward.workers=1", "env.workers=2",
            "ray.num_cpus=4", f"env.agent={REPO / 'environments' / 'math_agent.py'}:math_agent",
            f"env.kwargs.sandbox_url={sandbox_url}", f"output_dir={out}"]
    # From an unrelated directory: the agent file is loaded by absolute path in the actors.
    proc = subprocess.run([sys.executable, "-m", "rlpost.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/num_prompts"] == 4 and rows[0]["eval/episodes_failed"] == 0
    for row in rows[1:]:
        assert row["env/episodes"] == 8 and row["env/episodes_failed"] == 0
        assert row["gateway/sessions_created"] == 8 and row["gateway/requests"] >= 8
        assert row["policy/skipped"] == 0.0 and row["rollout/policy_version"] == row["step"] - 1
        # The trainer's log-probs of the session tokens equal the sampler's: the trained
        # ids, positions and mask are exactly the sampled ones (a shifted or re-tokenised
        # sequence would differ by whole nats).
        assert row["rollout/logprob_abs_diff_max"] < 1e-3
    assert sum(row["gateway/tool_calls"] for row in rows[1:]) > 0  # the tool model called tools
    assert "<tool_response>" in (out / "samples.jsonl").read_text()


def test_a_bad_agent_path_stops_the_run_before_ray_starts(tmp_path):
    args = [f"env.agent={REPO / 'environments' / 'math_agent.py'}:no_such_agent", f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "rlpost.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode != 0
    assert "env.agent: could not load" in proc.stderr + proc.stdout and "no attribute 'no_such_agent'" in proc.stderr
    assert "started Ray cluster" not in proc.stdout
