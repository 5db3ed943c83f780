"""Ctrl-C in a terminal: the shell sends SIGINT to the run's whole process group (the
driver and every Ray process it started). The first one stops like SIGTERM (finish
the step, checkpoint, print how to continue); a second one exits at once."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SMALL = [
    "+recipe=grpo_math", "data.train_batch_size=4", "rollout.n=2", "eval.every=0", "trainer.save_every=0",
    "reward.workers=1", "ray.num_cpus=4", "rollout.engine=hf",
]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    # A session of its own, like a command typed in a terminal: its pid is its process group.
    return subprocess.Popen([sys.executable, "-m", "rlpost.train", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(path: Path, child: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and not path.exists():
        assert child.poll() is None, child.communicate()[1][-3000:]
        time.sleep(0.2)
    assert path.exists(), f"{path} never appeared"


def _group_gone(pgid: int, timeout_s: float) -> bool:
    """True once no process of the group is left (Ray's processes die with the driver)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.time() >= deadline:
            return False
        time.sleep(0.5)


def _members(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [line.strip()[:120] for line in out.splitlines()]


def _cleanup(child: subprocess.Popen) -> None:
    if not _group_gone(child.pid, 0):
        try:
            os.killpg(child.pid, signal.SIGKILL)  # only the group this test started
        except ProcessLookupError:
            pass


@pytest.mark.integration
def test_first_ctrl_c_checkpoints_and_prints_the_command_that_continues(tmp_path):
    out = tmp_path / "run"
    child = _start([*SMALL, "trainer.total_steps=4", f"output_dir={out}"], tmp_path)
    try:
        _wait_for(out / "metrics.jsonl", child)  # step 1 is logged: training is under way
        os.killpg(child.pid, signal.SIGINT)
        stdout, stderr = child.communicate(timeout=300)
    finally:
        _cleanup(child)
    assert child.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "Ctrl-C: finishing the current step" in stderr
    stopped_at = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 1 <= stopped_at < 4

    # The printed command continues the run to the end.
    line = next(s for s in stderr.splitlines() if "to continue:" in s)
    command = shlex.split(line.split("to continue:", 1)[1])
    assert command[:3] == ["python", "-m", "rlpost.train"] and "resume=auto" in command
    proc = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(row)["step"] for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 5))


@pytest.mark.integration
def test_second_ctrl_c_exits_at_once_and_leaves_no_process(tmp_path):
    out = tmp_path / "run"
    child = _start([*SMALL, "trainer.total_steps=50", f"output_dir={out}"], tmp_path)
    try:
        _wait_for(out / "metrics.jsonl", child)
        os.killpg(child.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(child.pid, signal.SIGINT)
        # rc 130 (not 75) says it did not wait for the step; the bound only keeps a hang from stalling the suite.
        stdout, stderr = child.communicate(timeout=120)
        assert child.returncode == 130, stderr[-3000:]
        assert "second Ctrl-C" in stderr and "Traceback" not in stderr
        # The raylet stops its workers on SIGTERM; its agents notice it is gone within minutes.
        assert _group_gone(child.pid, 180), f"Ray processes outlived the driver: {_members(child.pid)}"
    finally:
        _cleanup(child)
