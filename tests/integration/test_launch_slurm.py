"""The rendered sbatch script, run for real on this machine as a one-node job: `srun`
and `scontrol` are stand-ins (srun runs its command here, scontrol records requeues),
everything else is real: Ray head via `ray start --block`, readiness poll, training
driver, SIGTERM trap. A first run is stopped by SIGTERM and must requeue itself and
stop Ray; the "requeued" run (SLURM_RESTART_COUNT=1) must finish."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlpost.launch.cli import main

psutil = pytest.importorskip("psutil", reason="needs psutil from the launch extra: pip install -e '.[launch]'")

BIN = Path(sys.executable).parent
RUN = ["+recipe=grpo_math", "trainer.total_steps=1", "data.train_batch_size=2", "rollout.n=2",
       "eval.every=0", "reward.workers=1"]
SRUN = """#!/bin/bash
# srun stand-in: drop srun's options, run the command on this (only) node.
while [ $# -gt 0 ]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; esac; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then echo localhost; else echo "$@" >> "$SCONTROL_LOG"; fi
"""


def _ray_procs(temp_dir: str) -> list:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.fixture
def slurm_env(tmp_path):
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    job_id = str(random.randint(10**6, 10**7))
    env = {**os.environ, "PATH": f"{shims}:{BIN}:{os.environ['PATH']}", "SLURM_JOB_ID": job_id,
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_PER_TASK": "2",
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "RAY_USAGE_STATS_ENABLED": "0"}
    ray_tmp = f"/tmp/rlpost-ray-{job_id}"
    yield env, ray_tmp
    for proc in _ray_procs(ray_tmp):  # only this job's Ray, by pid
        proc.kill()
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.integration
def test_sbatch_script_runs_requeues_and_resumes(slurm_env, tmp_path, capsys):
    env, ray_tmp = slurm_env
    out = tmp_path / "run"
    assert main(["slurm", "--cpus-per-task", "2", "--ray-cpus-per-node", "4", "--chdir", str(tmp_path),
                 "--ready-timeout", "90", *RUN, f"output_dir={out}"]) == 0
    script = tmp_path / "job.sbatch"
    script.write_text(capsys.readouterr().out)

    # First run: SIGTERM (what --signal=B:TERM@120 sends) once the driver is up.
    first = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.time() + 120
    for line in first.stdout:
        lines.append(line)
        if "rlpost: run directory" in line:
            first.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines)
    lines += first.stdout.readlines()
    first.wait(timeout=60)
    log = "".join(lines)
    assert first.returncode == 143, log
    assert "Ray cluster ready: 4 CPUs" in log, log
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", env["SLURM_JOB_ID"]], log
    time.sleep(2)
    assert not [p for p in _ray_procs(ray_tmp) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], log

    # The requeued run resumes (resume=auto) in the same output_dir and finishes.
    second = subprocess.run(["bash", str(script)], env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    log = second.stdout[-4000:] + second.stderr[-2000:]
    assert second.returncode == 0, log
    assert "training exited with status 0" in second.stdout, log
    assert (out / "metrics.jsonl").is_file() and (out / "final").is_dir(), log
    assert not [p for p in _ray_procs(ray_tmp) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], log
