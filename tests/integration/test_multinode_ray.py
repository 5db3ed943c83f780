"""A real multi-node Ray cluster on one machine: a head (custom resource ``node_a``) and a
second node (``node_b``, 2 logical GPUs), each its own `ray start --block` process with
its own raylet and object store, on this machine. The second node runs in a private mount
namespace where ``hidden/`` is an empty tmpfs: a node that does not share the driver's
filesystem there.

- ``ray.address: null`` starts its own local instance although the head runs and its
  ``ray_current_cluster`` pointer is where ``ray.init`` looks (``RAY_TMPDIR``).
- trainer on node_a, rollout replicas on node_b: the metrics equal the single-node run's.
- trainer rank 0 on node_b with the run directory under ``hidden/``: stops at start.
- GPU counts on ``auto`` resolve to 1 from the cluster although this driver has no GPU;
  the actors get GPUs from Ray and stop with the error naming the node.

Every process is started in its own process group and stopped by pid; `ray stop` would
also stop other users' clusters."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from rlpost.workers.cluster import free_port

psutil = pytest.importorskip("psutil", reason="stopping the Ray nodes' process trees needs psutil")

from ray_nodes import stop_ray_start  # noqa: E402  (needs psutil)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN = ["+recipe=grpo_math", "trainer.total_steps=2", "data.train_batch_size=2", "rollout.n=4",
       "rollout.max_new_tokens=16", "rollout.replicas=2", "rollout.engine=hf", "eval.every=0",
       "reward.workers=1", "trainer.save_every=0", "seed=3"]
CPU_ONLY = ["trainer.gpus_per_rank=0", "rollout.gpus_per_replica=0"]  # node_b declares (fake) GPUs
# Wall-clock figures; the rest is a function of the seed.
NOT_DETERMINISTIC = ("timing/", "rollout/tokens_per_s", "perf/mfu", "perf/tokens_per_s_per_device")


def _env(base: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
            "RAY_TMPDIR": str(base)}


def _node(args: list[str], env: dict, log: Path, wrap: list[str] = ()) -> subprocess.Popen:
    ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    cmd = [*wrap, str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           *ports, *args]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="rlmn", dir="/tmp"))  # short: Ray's socket paths are length-limited
    hidden = base / "hidden"
    hidden.mkdir()
    env = _env(base)
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs = []
    try:
        procs.append(_node(["--head", f"--port={port}", f"--ray-client-server-port={free_port()}",
                            "--include-dashboard=false", "--num-cpus=3", "--num-gpus=0",
                            '--resources={"node_a": 100}', f"--temp-dir={base / 'ray'}"], env, base / "head.log"))
        # A node whose view of hidden/ is its own empty tmpfs (private mount namespace).
        private = _can_unshare()
        wrap = ["unshare", "--mount", "sh", "-c", f'mount -t tmpfs none {hidden} && exec "$0" "$@"'] if private else []
        time.sleep(3)  # the head's GCS first
        procs.append(_node([f"--address={address}", "--num-cpus=3", "--num-gpus=2", '--resources={"node_b": 100}'],
                           env, base / "node_b.log", wrap))
        _wait_for_nodes(address, env, base, procs)
        # Ray registers a multi-node cluster's nodes on this machine's own address, not
        # 127.0.0.1 (`ray start` resolves loopback away unless the cluster is one node);
        # the pointer file names the GCS by that address.
        gcs = (base / "ray" / "ray_current_cluster").read_text().strip()
        assert gcs.endswith(f":{port}"), gcs
        yield {"address": gcs, "node_ip": gcs.rsplit(":", 1)[0], "base": base, "env": env, "private": private}
    finally:
        for proc in reversed(procs):
            stop_ray_start(proc, timeout_s=15)
        shutil.rmtree(base, ignore_errors=True)  # our own temp dir, ray_current_cluster pointer included


def _wait_for_nodes(address: str, env: dict, base: Path, procs: list) -> None:
    """Both nodes alive in the GCS (one probe process polls, so Ray is imported once)."""
    probe = ("import time, ray\n"
             "ray.init(address='%s', logging_level='ERROR', log_to_driver=False)\n"
             "deadline = time.time() + 90\n"
             "while sum(n['Alive'] for n in ray.nodes()) < 2 and time.time() < deadline:\n"
             "    time.sleep(1)\n"
             "print(sum(n['Alive'] for n in ray.nodes()))\n" % address)
    for _ in range(3):  # ray.init fails while the head's GCS is still starting
        for proc, name in zip(procs, ("head.log", "node_b.log")):
            assert proc.poll() is None, f"{name} exited:\n{(base / name).read_text()[-3000:]}"
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=150)
        if out.stdout.strip().endswith("2"):
            return
        time.sleep(2)
    raise AssertionError(f"two nodes never came up:\n{out.stdout[-500:]}\n{out.stderr[-2000:]}")


def _start_train(cluster, out: Path, *overrides: str, address: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rlpost.train", *RUN, f"output_dir={out}", *overrides]
    if address:
        cmd.append(f"ray.address={address}")
    return subprocess.Popen(cmd, cwd=REPO, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _train(cluster, out: Path, *overrides: str, address: str | None = None) -> subprocess.CompletedProcess:
    return _finish(_start_train(cluster, out, *overrides, address=address))


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(NOT_DETERMINISTIC)} for row in rows]


@pytest.mark.integration
def test_two_nodes_match_one_node(cluster, tmp_path):
    pointer = cluster["base"] / "ray" / "ray_current_cluster"
    assert pointer.read_text().strip() == cluster["address"]  # where ray.init(address=None) would go

    # Both at once (their start-ups mostly wait); neither shares anything with the other.
    single = _start_train(cluster, tmp_path / "single", *CPU_ONLY)  # ray.address: null
    split = _start_train(cluster, tmp_path / "split", *CPU_ONLY, "trainer.resources={node_a:1}",
                         "rollout.resources={node_b:1}", address=cluster["address"])
    single, split = _finish(single), _finish(split)
    log = single.stdout[-3000:] + single.stderr[-3000:]
    assert single.returncode == 0, log
    assert "rlpost: started Ray cluster" in single.stdout and cluster["address"] not in single.stdout, log

    log = split.stdout[-3000:] + split.stderr[-3000:]
    assert split.returncode == 0, log
    assert f"rlpost: joined Ray cluster at {cluster['address']} (2 node(s)" in split.stdout, log

    one, two = _metrics(tmp_path / "single"), _metrics(tmp_path / "split")
    assert [row["step"] for row in two] == [1, 2]
    assert two == one
    assert any(row["reward/mean"] != 0 or row["policy/entropy"] != 0 for row in two)  # a real run, not zeros


@pytest.mark.integration
def test_run_dir_not_shared_with_trainer_node_stops_at_start(cluster):
    if not cluster["private"]:
        pytest.skip("needs `unshare --mount` (root or user namespaces) to give node_b its own filesystem")
    out = cluster["base"] / "hidden" / "run"  # an empty tmpfs on node_b
    proc = _train(cluster, out, *CPU_ONLY, "trainer.resources={node_b:1}", "rollout.resources={node_a:1}",
                  "rollout.replicas=1", address=cluster["address"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "trainer rank 0 on node" in proc.stderr and "cannot write and read the run directory" in proc.stderr
    assert "must be one filesystem shared by the driver and every trainer node" in proc.stderr
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.integration
def test_gpus_requested_from_cluster_not_driver(cluster, tmp_path):
    import torch

    assert not torch.cuda.is_available()  # the driver (this machine) has no GPU
    out = tmp_path / "gpu"
    proc = _train(cluster, out, "rollout.replicas=1", address=cluster["address"])  # GPU counts on auto
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["trainer"]["gpus_per_rank"] == 1 and cfg["rollout"]["gpus_per_replica"] == 1
    assert cfg["critic"]["gpus_per_rank"] == 1
    # Ray gave the first actor the driver waits for one of node_b's GPUs (ids 0 or 1): the
    # trainer since start-up creates and awaits it first; the replica's own refusal may
    # also reach the log, depending on timing.
    assert re.search(r"(trainer rank|rollout replica) 0 was given GPU \[", proc.stderr), proc.stderr[-3000:]
    assert "on node " in proc.stderr and f"({cluster['node_ip']})" in proc.stderr
    assert "torch finds no usable CUDA device" in proc.stderr and "nvidia-smi" in proc.stderr


@pytest.mark.integration
def test_each_group_asks_ray_for_gpus(cluster):
    """Every actor kind, placed as the run places it, is handed a GPU by Ray and refuses
    it on this CUDA-less node with the node-naming error."""
    script = f"""
import ray
from rlpost.config.load import load_config
from rlpost.errors import WorkerError
from rlpost.workers.placement import GroupPlacement, resolve_placement, started_devices
from rlpost.workers.trainer_group import TrainerActor
from rlpost.workers.critic_group import CriticActor
from rlpost.workers.rollout_group import RolloutActor

ray.init(address="{cluster['address']}", logging_level="ERROR", log_to_driver=False)
cfg = load_config(["rollout.engine=fake"])
resolve_placement(cfg)
print("resolved", cfg.trainer.gpus_per_rank, cfg.rollout.gpus_per_replica, cfg.critic.gpus_per_rank)
for name, cls, args, gpus in (("trainer", TrainerActor, (0, 1), cfg.trainer.gpus_per_rank),
                              ("critic", CriticActor, (0, 1), cfg.critic.gpus_per_rank),
                              ("rollout", RolloutActor, (cfg, "unused", 0), cfg.rollout.gpus_per_replica)):
    place = GroupPlacement.create(name, 1, gpus, None, "pack", 60)
    print(name, "asks", place.options(0)["num_gpus"], "GPU")
    actor = cls.options(**place.options(0)).remote(*args)
    try:
        started_devices([actor], name)
    except WorkerError as err:
        print("refused:", err)
    ray.kill(actor)
    place.shutdown()
try:  # no node declares node_c
    GroupPlacement.create("trainer", 1, 0, {{"node_c": 1}}, "pack", 3)
except WorkerError as err:
    print("unplaceable:", err)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cluster["env"], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "resolved 1 1 1" in lines, proc.stdout
    for name, who in (("trainer", "trainer rank 0"), ("critic", "critic rank 0"), ("rollout", "rollout replica 0")):
        assert f"{name} asks 1 GPU" in lines, proc.stdout
        refused = [line for line in lines if line.startswith("refused:") and f"{who} was given GPU [" in line]
        assert refused and "no usable CUDA" in refused[0] and f"({cluster['node_ip']})" in refused[0], proc.stdout
    unplaceable = [line for line in lines if line.startswith("unplaceable: trainer: Ray could not place 1 x")]
    assert unplaceable and "'node_c': 1" in unplaceable[0] and "ray.placement_timeout_s=3s" in unplaceable[0], proc.stdout
