"""rlpost.launch: resource arithmetic, sbatch and RayJob rendering, dry runs and the
submit paths against local stand-ins (a recording `sbatch`, a local HTTP server that
plays the Kubernetes API)."""

import copy
import http.server
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from rlpost.config.load import load_config
from rlpost.errors import ConfigError
from rlpost.launch import k8s, slurm
from rlpost.launch.cli import main
from rlpost.launch.command import drop, pin
from rlpost.launch.ray_job import build_spec, describe, parse_env
from rlpost.launch.resources import ClusterShape, check_fits, job_needs, nodes_for

REPO = Path(__file__).resolve().parents[2]
# 2 trainer ranks + 2 rollout replicas = 4 GPUs; + 3 reward workers = 7 logical CPUs.
BIG = ["+recipe=grpo_math", "trainer.world_size=2", "rollout.replicas=2", "reward.workers=3"]


def _schema_dir() -> Path:
    for candidate in (os.environ.get("RLPOST_KUBERAY_SCHEMAS"), REPO.parent / "shared" / "schemas" / "kuberay"):
        if candidate and (Path(candidate) / "ray.io_rayjobs.yaml").is_file():
            return Path(candidate)
    pytest.skip("KubeRay CRDs not found: set RLPOST_KUBERAY_SCHEMAS or put them in ../shared/schemas/kuberay")


@pytest.fixture(scope="module")
def big_cfg():
    return load_config(BIG + ["output_dir=runs/big"])


# --- resources ---------------------------------------------------------------------


def test_needs_come_from_the_config(big_cfg):
    assert job_needs(big_cfg, with_gpus=True).gpus == 4
    assert job_needs(big_cfg, with_gpus=True).cpus == 7
    assert job_needs(big_cfg, with_gpus=False).gpus == 0
    assert nodes_for(job_needs(big_cfg, True), gpus_per_node=3) == 2  # ceil(4 / 3)


def test_too_small_cluster_names_the_numbers(big_cfg):
    needs = job_needs(big_cfg, with_gpus=True)
    check_fits(needs, ClusterShape(nodes=2, gpus_per_node=2, cpus_per_node=4))  # 4 GPUs, 8 CPUs: fits
    with pytest.raises(ConfigError, match=r"needs 4 GPUs.*1 nodes x 2 GPUs = 2"):
        check_fits(needs, ClusterShape(nodes=1, gpus_per_node=2, cpus_per_node=8))
    with pytest.raises(ConfigError, match=r"needs 7 logical CPUs.*2 nodes x 3 CPUs = 6"):
        check_fits(needs, ClusterShape(nodes=2, gpus_per_node=2, cpus_per_node=3))


@pytest.mark.parametrize("target", [
    ["slurm", "--nodes", "1", "--gpus-per-node", "2"],
    ["k8s", "--image", "img", "--pvc", "outputs", "--workers", "1", "--gpus-per-worker", "2"],
])
def test_cli_refuses_a_cluster_that_cannot_fit(target, capsys):
    assert main([*target, *BIG]) == 2
    err = capsys.readouterr().err
    assert "needs 4 GPUs" in err and "= 2" in err


def test_pin_replaces_earlier_settings():
    assert pin(["+recipe=x", "output_dir=a", "trainer.lr=1"], output_dir="/b", ray__address="auto") == \
        ["+recipe=x", "trainer.lr=1", "output_dir=/b", "ray.address=auto"]
    assert drop(["resume=never", "+ray.address=x", "seed=1"], "resume", "ray.address") == ["seed=1"]


# --- slurm -------------------------------------------------------------------------


def _render_slurm(cfg, overrides, **kw):
    opts = dict(nodes=2, gpus_per_node=2, cpus_per_task=4, ray_cpus_per_node=4, job_name="grpo",
                partition="gpu", time="04:00:00", account="proj", venv="/opt/venv",
                workdir="/scratch/me", log_dir="/scratch/me/logs")
    opts.update(kw)
    return slurm.render(cfg, overrides, slurm.SlurmOptions(**opts), job_needs(cfg, opts["gpus_per_node"] > 0))


def test_sbatch_script_starts_ray_then_trains():
    overrides = BIG + ["output_dir=runs/big", "resume=never"]
    script = _render_slurm(load_config(overrides), overrides)
    for line in ["#SBATCH --nodes=2", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00",
                 "#SBATCH --account=proj", "#SBATCH --job-name=grpo", "#SBATCH --chdir=/scratch/me",
                 "#SBATCH --output=/scratch/me/logs/slurm-%j.out",
                 "#SBATCH --requeue", "#SBATCH --signal=B:TERM@120", "source /opt/venv/bin/activate"]:
        assert line in script.splitlines(), line
    assert 'ray start --head --block --node-ip-address="$head_ip"' in script
    assert 'ray start --block --address="$ray_address" --num-cpus=4 --num-gpus=2' in script
    assert '--exclude="$head"' in script
    # Waits for what the config needs: 4 GPUs, 7 CPUs.
    assert 'have.get("GPU", 0) >= 4 and have.get("CPU", 0) >= 7' in script
    # The driver: output_dir pinned absolute, the user's resume replaced by the script's.
    train = next(line for line in script.splitlines() if line.startswith("python -m rlpost.train"))
    assert "output_dir=/scratch/me/runs/big" in train and "resume=never " not in train
    assert train.endswith('"resume=$resume" "ray.address=$ray_address" &')
    assert "resume=never" in script and 'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then resume=auto; fi' in script
    assert "trap on_term TERM" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_sbatch_script_is_valid_bash(big_cfg, tmp_path):
    path = tmp_path / "job.sbatch"
    for kw in ({}, {"container_image": "nvcr.io/me/rlpost:1", "venv": None}, {"gpus_per_node": 4, "nodes": 1, "ray_cpus_per_node": 8}):
        path.write_text(_render_slurm(big_cfg, BIG, **kw))
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_cpu_only_sbatch_has_no_gpu_request():
    cfg = load_config(["+recipe=grpo_math", "reward.workers=1"])
    script = _render_slurm(cfg, [], nodes=1, gpus_per_node=0, cpus_per_task=2, ray_cpus_per_node=4)
    assert "--gpus-per-node" not in script and "--num-gpus=0" in script and "--num-cpus=4" in script


# --- k8s ---------------------------------------------------------------------------


def _manifest(cfg, overrides=BIG, **kw):
    opts = dict(image="ghcr.io/me/rlpost:1", pvc="rlpost-outputs", workers=2, gpus_per_worker=2,
                cpus_per_worker=4, name="rlpost-big")
    opts.update(kw)
    return k8s.render_manifest(cfg, overrides, k8s.K8sOptions(**opts), job_needs(cfg, opts["gpus_per_worker"] > 0))


def _strict(schema):
    """Reject unknown fields the way `kubectl apply --validate=strict` does: an
    object schema with `properties` and nothing else allowed."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayjob_schema():
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load((_schema_dir() / "ray.io_rayjobs.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema))


def test_rayjob_validates_against_the_kuberay_crd(big_cfg, rayjob_schema):
    manifest = yaml.safe_load(k8s.to_yaml(_manifest(big_cfg)))  # what kubectl would read
    errors = [f"{list(e.path)}: {e.message}" for e in rayjob_schema.iter_errors(manifest)]
    assert not errors, errors


def test_crd_validation_catches_mistakes(big_cfg, rayjob_schema):
    bad = copy.deepcopy(_manifest(big_cfg))
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    bad["spec"]["shutdownAfterJobFinish"] = True  # misspelt key
    messages = " ".join(e.message for e in rayjob_schema.iter_errors(bad))
    assert "'two' is not of type 'integer'" in messages and "shutdownAfterJobFinish" in messages


def test_pod_templates_are_valid_pods(big_cfg):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the launch extra")
    cluster = _manifest(big_cfg)["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, **template}
        kv.validate(pod, kv.latest_version(), strict=True)  # raises on a malformed pod
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                     "spec": {"containers": [{"image": "x"}]}}, kv.latest_version(), strict=True)


def test_rayjob_resources_entrypoint_and_storage(big_cfg):
    manifest = _manifest(big_cfg)
    spec = manifest["spec"]
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 3600
    assert spec["entrypoint"].startswith("python -m rlpost.train +recipe=grpo_math")
    assert spec["entrypoint"].endswith("output_dir=/outputs/runs/big ray.address=auto")
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "2"
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for pod in (head["template"], group["template"]):
        assert {"name": "outputs", "persistentVolumeClaim": {"claimName": "rlpost-outputs"}} in pod["spec"]["volumes"]
        assert {"name": "outputs", "mountPath": "/outputs"} in pod["spec"]["containers"][0]["volumeMounts"]


def test_output_dir_must_be_on_the_pvc(big_cfg):
    cfg = load_config(BIG + ["output_dir=/tmp/elsewhere"])
    with pytest.raises(ConfigError, match="not under the PVC mount /outputs"):
        _manifest(cfg)
    assert k8s.pod_output_dir("/outputs/a", "/outputs") == "/outputs/a"


# --- dry runs and submission --------------------------------------------------------


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch-calls"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "4242;local"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


def test_slurm_dry_run_submits_nothing(fake_sbatch, tmp_path, capsys):
    log_dir = tmp_path / "logs"
    args = ["slurm", "--dry-run", "--submit", "--log-dir", str(log_dir), "+recipe=grpo_math",
            f"output_dir={tmp_path / 'run'}"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("#!/bin/bash")
    assert not fake_sbatch.exists() and not log_dir.exists() and not (tmp_path / "run").exists()


def test_slurm_submit_runs_sbatch(fake_sbatch, tmp_path, capsys):
    log_dir = tmp_path / "logs"
    assert main(["slurm", "--submit", "--job-name", "t1", "--log-dir", str(log_dir), "+recipe=grpo_math"]) == 0
    out = capsys.readouterr().out
    assert "submitted Slurm job 4242" in out and str(log_dir / "slurm-4242.out") in out
    assert fake_sbatch.read_text().split() == ["--parsable", str(log_dir / "t1.sbatch")]
    assert (log_dir / "t1.sbatch").read_text().startswith("#!/bin/bash")


def test_local_and_ray_dry_runs_start_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["local", "--dry-run", "+recipe=grpo_math", f"output_dir={out}"]) == 0
    assert capsys.readouterr().out.strip() == f"python -m rlpost.train +recipe=grpo_math output_dir={out}"
    # Port 9 on loopback has no job server: a dry run must not try to reach it.
    assert main(["ray", "--dry-run", "--address", "http://127.0.0.1:9", "--env", "WANDB_API_KEY=sekrit",
                 "+recipe=grpo_math", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert f"entrypoint: python -m rlpost.train +recipe=grpo_math output_dir={out} ray.address=auto" in printed
    assert "WANDB_API_KEY=***" in printed and "sekrit" not in printed and "TOKENIZERS_PARALLELISM=false" in printed
    assert not out.exists()


def test_ray_job_ships_the_checkout_without_venv_or_outputs():
    cfg = load_config(["+recipe=grpo_math", "output_dir=runs/rel"])
    spec = build_spec(cfg, ["+recipe=grpo_math"], "http://127.0.0.1:8265", REPO, parse_env(["A=1"]))
    assert spec.runtime_env["working_dir"] == str(REPO)
    assert {".venv", "runs", ".cache", ".git"} <= set(spec.runtime_env["excludes"])
    assert spec.runtime_env["env_vars"] == {"A": "1"}
    assert spec.warnings and "relative" in spec.warnings[0]  # would land in Ray's temp dir
    assert "output_dir=runs/rel" in describe(spec)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_env(["novalue"])


class _FakeKubeAPI(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        reply = json.dumps(body).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def kube_api(tmp_path):
    pytest.importorskip("kubernetes", reason="k8s --submit needs the kubernetes client (launch extra)")
    _FakeKubeAPI.requests = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeKubeAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "me"}}],
        "users": [{"name": "me", "user": {"token": "t"}}],
    }))
    yield kubeconfig, _FakeKubeAPI.requests
    server.shutdown()
    server.server_close()


def test_k8s_submit_creates_the_rayjob(kube_api, capsys):
    kubeconfig, requests = kube_api
    args = ["k8s", "--image", "img:1", "--pvc", "outs", "--namespace", "team", "--kubeconfig", str(kubeconfig),
            "+recipe=grpo_math", "output_dir=runs/a"]
    assert main([*args, "--dry-run", "--submit"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert requests == []  # the dry run sent nothing
    assert main([*args, "--submit"]) == 0
    assert "created RayJob team/rlpost-a" in capsys.readouterr().out
    assert len(requests) == 1
    path, body = requests[0]
    assert path == "/apis/ray.io/v1/namespaces/team/rayjobs"
    assert body == printed
