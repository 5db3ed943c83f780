"""Submit a run to an existing Ray cluster as a Ray job.

The job ships the working directory (the rlpost checkout, or the current directory
for an installed rlpost) through ``runtime_env.working_dir``; the cluster's Python
environment must already hold rlpost's dependencies. The entrypoint joins the
cluster with ``ray.address=auto`` (the job supervisor sets ``RAY_ADDRESS``).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlpost.config.schema import RunConfig
from rlpost.errors import ConfigError, WorkerError
from rlpost.launch.command import pin, shell_line, train_argv
from rlpost.workers.cluster import ACTOR_ENV

# Never shipped: environments, outputs and caches can be gigabytes (Ray caps a
# working_dir upload at a few hundred MiB), and .git is history the job does not need.
EXCLUDES = [".venv", "venv", "runs", "outputs", "wandb", ".cache", ".git", "build", "dist",
            "*.egg-info", "__pycache__", ".pytest_cache"]
# Local settings a job should see the same way the local run would.
PASSTHROUGH_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "RLPOST_CACHE", "WANDB_MODE")
_SECRET = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD)(_|$)")  # masked in --dry-run output


@dataclass
class RayJobSpec:
    entrypoint: str
    runtime_env: dict
    address: str
    submission_id: str | None = None
    warnings: list[str] = field(default_factory=list)


def default_working_dir() -> Path:
    """The rlpost checkout when running from one, else the current directory."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "configs").is_dir():
        return root
    return Path.cwd()


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def job_env(extra: dict[str, str]) -> dict[str, str]:
    # The driver's ray.init (rlpost.workers.cluster.start_cluster) passes env_vars that
    # repeat some of these keys with the same values; Ray refuses such a merge unless
    # told that the driver's runtime_env may override the job's.
    env = {**ACTOR_ENV, "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    env.update({k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ})
    env.update(extra)
    return env


def build_spec(cfg: RunConfig, overrides: list[str], address: str, working_dir: Path,
               env: dict[str, str], submission_id: str | None = None) -> RayJobSpec:
    if not working_dir.is_dir():
        raise ConfigError(f"--working-dir {working_dir} is not a directory")
    argv = train_argv(pin(overrides, output_dir=cfg.output_dir, ray__address="auto"))
    spec = RayJobSpec(
        entrypoint=shell_line(argv),
        runtime_env={"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": env},
        address=address,
        submission_id=submission_id,
    )
    if not os.path.isabs(cfg.output_dir):
        spec.warnings.append(
            f"output_dir={cfg.output_dir} is relative: it resolves inside the job's unpacked working "
            "directory on the cluster, which Ray may delete; pass an absolute output_dir on shared storage"
        )
    return spec


def describe(spec: RayJobSpec) -> str:
    """What --dry-run prints: the submission, secrets masked."""
    env = {k: ("***" if _SECRET.search(k.upper()) else v)
           for k, v in spec.runtime_env["env_vars"].items()}
    lines = [f"# Ray job for {spec.address}", f"entrypoint: {spec.entrypoint}",
             f"working_dir: {spec.runtime_env['working_dir']}",
             f"excludes: {', '.join(spec.runtime_env['excludes'])}", "env_vars:"]
    lines += [f"  {k}={v}" for k, v in env.items()]
    if spec.submission_id:
        lines.append(f"submission_id: {spec.submission_id}")
    return "\n".join(lines)


def _submit_when_ready(client, spec: RayJobSpec, timeout_s: float = 120.0) -> str:
    """``submit_job``, retried while a freshly started cluster's job agent is not yet
    registered (the job server waits about 10 s per request, then answers 500 "No
    available agent"); on a loaded machine the agent has taken over a minute."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                                     submission_id=spec.submission_id)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise WorkerError(f"the Ray job server at {spec.address} refused the job: {err}") from None
        time.sleep(1)


def submit(spec: RayJobSpec, wait: bool) -> int:
    """Submit; print the job id. With ``wait``, follow its logs and return 0 only if it
    succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(spec.address)
    except (ConnectionError, RuntimeError) as err:
        raise WorkerError(f"cannot reach the Ray job server at {spec.address}: {err}") from None
    job_id = _submit_when_ready(client, spec)
    print(f"rlpost: submitted Ray job {job_id} to {spec.address}", flush=True)
    if not wait:
        print(f"rlpost: follow it with `ray job logs --address {spec.address} --follow {job_id}`")
        return 0

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        print(f"\nrlpost: stopped following; job {job_id} keeps running "
              f"(`ray job stop --address {spec.address} {job_id}` ends it)", file=sys.stderr)
        return 130
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the log stream can close a moment before the status flips
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    print(f"rlpost: Ray job {job_id} finished: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
