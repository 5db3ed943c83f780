"""`rlpost ray --wait` against a real Ray cluster with its job server: a head started
here (own ports, own temp dir), a one-step run submitted as a Ray job with the
working directory shipped, then a failing job. The head and everything it spawned are
stopped by pid; `ray stop` would also stop other users' local clusters."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from rlpost.workers.cluster import free_port

psutil = pytest.importorskip("psutil", reason="needs ray[default] (psutil) for the Ray job server")

from ray_nodes import stop_ray_start  # noqa: E402  (needs psutil)
pytest.importorskip("aiohttp", reason="the Ray job server needs ray[default]: pip install 'rlpost[launch]'")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN = ["+recipe=grpo_math", "trainer.total_steps=1", "data.train_batch_size=2", "rollout.n=2",
       "eval.every=0", "reward.workers=1"]


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rlray", dir="/tmp")  # short: Ray's socket paths are length-limited
    dashboard_port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is ours
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
         f"--ray-client-server-port={free_port()}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         # Not the default 52365: another Ray instance on the machine (a run beside the tests) may
         # hold it, and a head whose agent cannot bind refuses every job ("No available agent").
         f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=temp_dir,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{Path(log.name).read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"no Ray job server at {address}:\n{Path(log.name).read_text()[-3000:]}"
            time.sleep(1)
        yield address, Path(temp_dir)
    finally:
        stop_ray_start(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _launch(head, *overrides: str) -> tuple[subprocess.CompletedProcess, str]:
    address, temp_dir = head
    proc = subprocess.run(
        [sys.executable, "-m", "rlpost.launch", "ray", "--address", address, "--wait", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    agent_logs = sorted(temp_dir.glob("session_*/logs/dashboard_agent.log"))
    agent = agent_logs[-1].read_text()[-1500:] if agent_logs else "(no dashboard_agent.log)"
    return proc, f"{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}\n--- dashboard agent log ---\n{agent}"


@pytest.mark.integration
def test_ray_job_trains_one_step(ray_head, tmp_path):
    out = tmp_path / "run"
    proc, log = _launch(ray_head, *RUN, f"output_dir={out}")
    assert proc.returncode == 0, log
    assert "rlpost: submitted Ray job" in proc.stdout and "SUCCEEDED" in proc.stdout, log
    assert (out / "metrics.jsonl").is_file(), log
    assert (out / "final").is_dir(), log


@pytest.mark.integration
def test_ray_job_failure_exits_nonzero(ray_head, tmp_path):
    proc, log = _launch(ray_head, *RUN, f"output_dir={tmp_path / 'run'}", f"model.path={tmp_path / 'no-such-model'}")
    assert proc.returncode == 1, log
    assert "FAILED" in proc.stdout, log
