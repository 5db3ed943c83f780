"""The grpo_agent_openai recipe through Ray: `python -m rlpost.train` starts the
gateway in front of the rollout group, the example agent (environments/math_agent.py,
openai client only) runs in agent actors against its sessions and calls the real
sandbox's python tool (when the model asks for it) through tool_calls; 2 steps with
tiny shapes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sandbox_url():
    if shutil.which("bwrap") is None:  # as tests/integration/test_sandbox.py
        pytest.skip("bubblewrap (bwrap) not installed: apt-get install bubblewrap")
    from rlpost.sandbox.server import start_local, stop_local

    proc, url = start_local(0)
    yield url
    stop_local(proc)


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
