"""Render (and optionally submit) an sbatch script that runs one training job on a
Ray cluster spanning the allocation.

The script starts a Ray head on the first node and a worker on each other node (one
``srun`` task per node, ``ray start --block`` so killing the step stops Ray), waits
until ``ray.cluster_resources()`` has what the run needs, runs the driver on the head
node and stops the cluster. Near the time limit Slurm sends SIGTERM to the batch shell
(``--signal=B:TERM@120``); the trap stops the driver and Ray and requeues the job,
which then resumes with ``resume=auto`` from the same, pinned ``output_dir``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template

from rlpost.config.schema import RunConfig
from rlpost.errors import ConfigError, WorkerError
from rlpost.launch.command import drop, pin, shell_line, train_argv
from rlpost.launch.ray_job import PASSTHROUGH_ENV
from rlpost.launch.resources import ClusterShape, JobNeeds, check_fits
from rlpost.workers.cluster import ACTOR_ENV


@dataclass(frozen=True)
class SlurmOptions:
    nodes: int
    gpus_per_node: int
    cpus_per_task: int  # Slurm cores per node (one task per node)
    ray_cpus_per_node: int  # logical CPUs Ray advertises per node (may exceed cores)
    job_name: str = "rlpost"
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    container_image: str | None = None  # pyxis/enroot image; otherwise venv below
    venv: str | None = None
    workdir: str = "."  # absolute: the job's --chdir, where relative output_dir lands
    log_dir: str = "."  # absolute; must exist before sbatch runs
    ready_timeout_s: int = 300


class _Script(Template):
    delimiter = "@@"  # bash owns `$`


_TEMPLATE = _Script("""\
#!/bin/bash
# rlpost: `python -m rlpost.train` on a Ray cluster spanning this Slurm allocation.
# Rendered by `rlpost slurm`. The log directory must exist before `sbatch` (--submit makes it).
@@{sbatch_lines}
set -uo pipefail

@@{env_setup}
export @@{exports}

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
if [ "$SLURM_JOB_NUM_NODES" -eq 1 ]; then
  head_ip=127.0.0.1  # one node: keep Ray on loopback
  # Ray on Linux swaps a 127.0.0.1 node address for the routable one unless told not to.
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
else
  # `hostname --ip-address` can answer 127.0.1.1 on Debian hosts; -I lists real addresses.
  head_ip=$(srun --overlap --nodes=1 --ntasks=1 -w "$head" hostname -I | awk '{print $1}')
fi
# Free ports on the head, so jobs sharing a node do not collide on Ray's defaults.
read -r ray_port client_port < <(@@{on_head}python -c 'import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("", 0))
print(*[x.getsockname()[1] for x in s])')
ray_address="$head_ip:$ray_port"
ray_pids=()
train_pid=""

stop_ray() {
  [ ${#ray_pids[@]} -gt 0 ] || return 0
  kill -TERM "${ray_pids[@]}" 2>/dev/null
  wait "${ray_pids[@]}" 2>/dev/null
  ray_pids=()
}

on_term() {
  echo "rlpost: SIGTERM (time limit or preemption): stopping; the requeued job resumes from @@{output_dir}"
  if [ -n "$train_pid" ]; then kill -TERM "$train_pid" 2>/dev/null; wait "$train_pid"; fi
  stop_ray
  scontrol requeue "$SLURM_JOB_ID" || echo "rlpost: could not requeue $SLURM_JOB_ID (cancelled?)"
  exit 143
}
trap on_term TERM

echo "rlpost: Ray head on $head ($ray_address), $SLURM_JOB_NUM_NODES node(s)"
srun --overlap --nodes=1 --ntasks=1 --cpus-per-task=@@{cpus_per_task} -w "$head" @@{container}\\
  ray start --head --block --node-ip-address="$head_ip" --port="$ray_port" \\
  --ray-client-server-port="$client_port" --num-cpus=@@{ray_cpus} --num-gpus=@@{gpus} \\
  --temp-dir="/tmp/rlpost-ray-$SLURM_JOB_ID" --include-dashboard=false --disable-usage-stats &
ray_pids+=($!)
if [ "$SLURM_JOB_NUM_NODES" -gt 1 ]; then
  workers=$((SLURM_JOB_NUM_NODES - 1))
  srun --overlap --nodes=$workers --ntasks=$workers --ntasks-per-node=1 --cpus-per-task=@@{cpus_per_task} \\
    --exclude="$head" @@{container}\\
    ray start --block --address="$ray_address" --num-cpus=@@{ray_cpus} --num-gpus=@@{gpus} \\
    --disable-usage-stats &
  ray_pids+=($!)
fi

# Wait until the cluster has what the run needs (workers join after the head is up).
if ! RLPOST_RAY_ADDRESS="$ray_address" @@{on_head}python - <<'PY'
import os, socket, sys, time
deadline = time.time() + @@{ready_timeout_s}
host, port = os.environ["RLPOST_RAY_ADDRESS"].rsplit(":", 1)
while True:
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("rlpost: the Ray head did not come up within @@{ready_timeout_s}s")
        time.sleep(2)
import ray
ray.init(address=os.environ["RLPOST_RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
while True:
    have = ray.cluster_resources()
    if have.get("GPU", 0) >= @@{need_gpus} and have.get("CPU", 0) >= @@{need_cpus}:
        print(f"rlpost: Ray cluster ready: {have.get('CPU', 0):.0f} CPUs, {have.get('GPU', 0):.0f} GPUs")
        break
    if time.time() > deadline:
        sys.exit(f"rlpost: after @@{ready_timeout_s}s the Ray cluster has {have}; the run needs "
                 "@@{need_gpus} GPUs and @@{need_cpus} CPUs")
    time.sleep(2)
ray.shutdown()
PY
then
  stop_ray
  exit 1
fi

resume=@@{resume}
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then resume=auto; fi  # a requeued run continues
@@{on_head}@@{train} "resume=$resume" "ray.address=$ray_address" &
train_pid=$!
wait "$train_pid"
status=$?
train_pid=""
stop_ray
echo "rlpost: training exited with status $status"
exit $status
""")


def _sbatch_lines(opts: SlurmOptions) -> list[str]:
    lines = [f"--job-name={opts.job_name}", f"--nodes={opts.nodes}", "--ntasks-per-node=1",
             f"--cpus-per-task={opts.cpus_per_task}"]
    if opts.gpus_per_node > 0:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    for flag, value in (("partition", opts.partition), ("time", opts.time), ("account", opts.account)):
        if value:
            lines.append(f"--{flag}={value}")
    lines += [f"--chdir={opts.workdir}", f"--output={opts.log_dir}/slurm-%j.out",
              "--open-mode=append",  # a requeued run appends to the same log
              "--requeue", "--signal=B:TERM@120"]
    return [f"#SBATCH {line}" for line in lines]


def _env_setup(opts: SlurmOptions) -> tuple[str, str, str]:
    """(shell setup line, prefix to run a command on the head, prefix for srun steps)."""
    if opts.container_image:
        mounts = f"--container-image={shlex.quote(opts.container_image)} " \
                 f"--container-mounts={shlex.quote(opts.workdir)}:{shlex.quote(opts.workdir)} " \
                 f"--container-workdir={shlex.quote(opts.workdir)} "
        on_head = f'srun --overlap --nodes=1 --ntasks=1 -w "$head" {mounts}'
        return f"# container {opts.container_image} (pyxis)", on_head, mounts
    if opts.venv:
        return f"source {shlex.quote(opts.venv)}/bin/activate", "", ""
    return "# no --venv or --container-image: python and ray come from the login environment", "", ""


def render(cfg: RunConfig, overrides: list[str], opts: SlurmOptions, needs: JobNeeds) -> str:
    check_fits(needs, ClusterShape(opts.nodes, opts.gpus_per_node, opts.ray_cpus_per_node),
               hint=" (--nodes, --gpus-per-node, --cpus-per-task, --ray-cpus-per-node)")
    if not re.fullmatch(r"[\w.-]+", opts.job_name):
        raise ConfigError(f"--job-name may hold letters, digits, '.', '_' and '-'; got {opts.job_name!r}")
    env = {**ACTOR_ENV, **{k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}}
    setup, on_head, container = _env_setup(opts)
    # The script appends `resume` and `ray.address` itself; output_dir is pinned absolute
    # so the requeued job finds its checkpoints whatever the cwd.
    output_dir = os.path.join(opts.workdir, cfg.output_dir)
    train = shell_line(train_argv(pin(drop(overrides, "resume", "ray.address"), output_dir=output_dir)))
    return _TEMPLATE.substitute(
        sbatch_lines="\n".join(_sbatch_lines(opts)), env_setup=setup,
        exports=" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()),
        on_head=on_head, container=container, cpus_per_task=opts.cpus_per_task,
        ray_cpus=opts.ray_cpus_per_node, gpus=opts.gpus_per_node, need_gpus=needs.gpus,
        need_cpus=needs.cpus, ready_timeout_s=opts.ready_timeout_s, train=train,
        resume=shlex.quote(cfg.resume), output_dir=output_dir,
    )


def submit(script: str, opts: SlurmOptions, output_dir: str) -> str:
    """Write the script next to the run's outputs, ``sbatch`` it, return the job id."""
    log_dir = Path(opts.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{opts.job_name}.sbatch"
    path.write_text(script)
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise WorkerError("sbatch is not on PATH: run on a Slurm login node, or use --dry-run") from None
    if proc.returncode != 0:
        raise WorkerError(f"sbatch {path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"rlpost: submitted Slurm job {job_id} ({path})")
    print(f"rlpost: log {log_dir / f'slurm-{job_id}.out'}; outputs {output_dir}", file=sys.stdout)
    return job_id
