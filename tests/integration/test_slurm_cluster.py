"""A real one-node Slurm cluster on localhost: `munged`, `slurmctld` and `slurmd` from
Debian (`apt-get install slurm-wlm munge`; `.ci/run` installs them), started by
`scripts/slurm_localhost.sh` on loopback with a private munge key and config. A tiny
`+recipe=grpo_math` job goes through `rlpost slurm --submit` (real `sbatch`, `srun`,
`scontrol` in the batch script) and must complete with metrics and a final model.

Skipped, with the reason, only where Slurm is not installed or cannot run here (not
root). Unlike tests/integration/test_launch_slurm.py nothing is stubbed."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "slurm_localhost.sh"
RUN = ["+recipe=grpo_math", "trainer.total_steps=1", "data.train_batch_size=2", "rollout.n=2",
       "eval.every=0", "reward.workers=1"]
JOB_TIMEOUT_S = int(os.environ.get("RLPOST_SLURM_JOB_TIMEOUT", "420"))  # cold tiny-model build ~80 s
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
        "DEADLINE", "PREEMPTED"}
NEEDED = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")

pytestmark = pytest.mark.integration


def _why_not() -> str | None:
    missing = [exe for exe in NEEDED if shutil.which(exe) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not on PATH): "
                "apt-get install slurm-wlm munge (.ci/run does)")
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd runs jobs as the submitting user)"
    return None


def _client_env(slurm_dir: Path) -> dict:
    # Drop any outer allocation's SLURM_* (pytest itself might run in a Slurm job).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(slurm_dir / "slurm.conf")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    why = _why_not()
    if why:
        pytest.skip(why)
    slurm_dir = tmp_path_factory.mktemp("slurm")
    env = _client_env(slurm_dir)
    started = time.monotonic()
    proc = subprocess.run(["bash", str(SETUP), "start", str(slurm_dir)], env=env, capture_output=True,
                          text=True, timeout=180)
    try:
        assert proc.returncode == 0, f"slurm_localhost.sh start failed:\n{proc.stdout}\n{proc.stderr}"
        print(f"slurm cluster up in {time.monotonic() - started:.1f}s: {proc.stdout.strip()}")
        yield env, slurm_dir
    finally:
        stop = subprocess.run(["bash", str(SETUP), "stop", str(slurm_dir)], env=env, capture_output=True,
                              text=True, timeout=120)
        print(stop.stdout, stop.stderr)


def _job_fields(job_id: str, env: dict) -> dict:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def _wait(job_id: str, env: dict, timeout_s: int) -> dict:
    deadline = time.monotonic() + timeout_s
    fields = {}
    while time.monotonic() < deadline:
        fields = _job_fields(job_id, env) or fields
        if fields.get("JobState") in DONE:
            return fields
        time.sleep(3)
    return fields


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-8000:] if path.is_file() else f"(no log at {path})"


def test_grpo_math_job_on_real_slurm(slurm_cluster, tmp_path):
    env, slurm_dir = slurm_cluster
    out = tmp_path / "run"
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "rlpost.launch", "slurm", "--submit", "--nodes", "1", "--gpus-per-node", "0",
           "--cpus-per-task", "2", "--ray-cpus-per-node", "4", "--venv", sys.prefix, "--chdir", str(tmp_path),
           "--log-dir", str(logs), "--job-name", "rlpost-slurm-test", "--time", "00:15:00",
           "--ready-timeout", "180", *RUN, f"output_dir={out}"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"submitted Slurm job (\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    job_id = match.group(1)
    log = logs / f"slurm-{job_id}.out"
    started = time.monotonic()
    try:
        fields = _wait(job_id, env, JOB_TIMEOUT_S)
        took = time.monotonic() - started
        print(f"job {job_id}: {fields.get('JobState')} in {took:.0f}s")
        state = fields.get("JobState")
        assert state == "COMPLETED", (
            f"job {job_id} is {state} (ExitCode={fields.get('ExitCode')}, Reason={fields.get('Reason')}) "
            f"after {took:.0f}s\n--- {log}\n{_log(log)}\n--- slurmd.log\n{_log(slurm_dir / 'log' / 'slurmd.log')}")
        assert fields.get("ExitCode") == "0:0", fields
        text = _log(log)
        assert "rlpost: Ray cluster ready: 4 CPUs" in text, text
        assert "training exited with status 0" in text, text

        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert 1 in [r.get("step") for r in records], records
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(str(out / "final")).model_type, text
    finally:
        if _job_fields(job_id, env).get("JobState") not in DONE:
            subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
            _wait(job_id, env, 60)
        shutil.rmtree(f"/tmp/rlpost-ray-{job_id}", ignore_errors=True)
