"""environments/fix_test.py against the real sandbox service: the terminal tool edits the
uploaded repository in the episode's session, the reward is the restored test's result
in that session, and the session is gone once the episode closes.

Skipped, with the reason, only where `bwrap` is not installed (`.ci/run` installs it)."""

import json
import shutil
import time

import pytest

from environments.fix_test import REPOS, FixTestEnv, make_rows
from rlpost.envs import Task
from rlpost.errors import SandboxError
from rlpost.sandbox.server import start_local, stop_local

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed: apt-get install bubblewrap"),
]


@pytest.fixture(scope="module")
def sandbox_url():
    proc, url = start_local(args=["--max-concurrency", "2"])
    yield url
    stop_local(proc)


def call(command):
    return f'<tool_call>{json.dumps({"name": "terminal", "arguments": {"command": command}})}</tool_call>'


def task(variant):
    row = make_rows("train", len(REPOS), 0)[variant]
    return Task(uid=f"v{variant}", question=row["prompt"], answer=row["answer"], metadata={"variant": row["variant"]})


def test_every_repository_fails_as_shipped_and_a_fix_passes(sandbox_url):
    fixes = {0: "sed -i 's/a - b/a + b/' arith.py", 1: "sed -i 's/== 1/== 0/' parity.py",
             2: "sed -i 's/::1/::-1/' text.py", 3: "sed -i 's/x < best/x > best/' stats.py",
             4: "sed -i 's/range(1, n)/range(1, n + 1)/' fact.py"}
    assert sorted(fixes) == list(range(len(REPOS)))
    for variant, fix in fixes.items():
        env = FixTestEnv(sandbox_url)
        env.reset(task(variant))
        assert env.tools[0].name == "terminal"
        # The shipped test fails; the model sees the failure through the tool.
        look = env.step(call("python3 -m unittest 2>&1 | tail -1"))
        assert not look.done and look.reward == {"accuracy": 0.0}
        assert look.observation[0]["role"] == "tool" and "FAILED" in look.observation[0]["content"]
        fixed = env.step(call(fix))
        assert fixed.done and fixed.reward == {"accuracy": 1.0}, variant
        env.close()


def test_cheating_on_the_test_does_not_pay_and_the_session_closes(sandbox_url):
    env = FixTestEnv(sandbox_url)
    env.reset(task(0))
    session = env.session
    assert not env.step(call("rm test_arith.py")).done  # the check restores the test
    shadow = "printf 'import sys\\nprint(\"PASS\")\\nsys.exit(0)\\n' > unittest.py"
    assert not env.step(call(shadow)).done  # the check imports the real unittest first
    # A final answer without a fix ends the episode with the test's verdict.
    final = env.step("DONE")
    assert final.done and final.reward == {"accuracy": 0.0}
    env.close()  # the DELETE goes out on a thread of its own
    deadline = time.monotonic() + 10
    while True:
        try:
            session._call("POST", f"/sessions/{session.id}/run", {"bash": "true"}, 10.0)
        except SandboxError as e:
            assert "HTTP 404" in str(e) and "deleted" in str(e)
            break
        assert time.monotonic() < deadline, "the episode's session was never deleted"
        time.sleep(0.1)
