"""Render (and optionally submit) a KubeRay ``RayJob``: a Ray cluster with a head pod
(runs the driver only, ``num-cpus: 0``) and one worker group sized from the config,
the training entrypoint, and a PVC mounted on every pod for checkpoints and outputs.

The image must hold rlpost and its dependencies (the manifest ships no code). The
cluster is deleted when the job ends (``shutdownAfterJobFinishes``); anything not on
the PVC is lost with it, which is why ``output_dir`` must lie under the mount.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

import yaml

from rlpost.config.schema import RunConfig
from rlpost.errors import ConfigError, WorkerError
from rlpost.launch.command import pin, shell_line, train_argv
from rlpost.launch.resources import ClusterShape, JobNeeds, check_fits
from rlpost.workers.cluster import ACTOR_ENV

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MAX_NAME = 47  # KubeRay derives longer pod/service names from it


@dataclass(frozen=True)
class K8sOptions:
    image: str
    pvc: str
    workers: int
    gpus_per_worker: int
    cpus_per_worker: int
    name: str = "rlpost"
    namespace: str = "default"
    mount_path: str = "/outputs"
    memory_per_worker: str = "16Gi"
    head_cpus: int = 2
    head_memory: str = "8Gi"
    ttl_seconds: int = 3600
    ray_version: str = ""


def default_name(output_dir: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", posixpath.basename(output_dir.rstrip("/")).lower()).strip("-")
    return f"rlpost-{base}"[:_MAX_NAME].rstrip("-") if base else "rlpost"


def pod_output_dir(output_dir: str, mount_path: str) -> str:
    """Where the run writes inside the pods: under the PVC mount."""
    if not posixpath.isabs(mount_path):
        raise ConfigError(f"--mount-path must be absolute, got {mount_path!r}")
    if not posixpath.isabs(output_dir):
        return posixpath.join(mount_path, output_dir)
    inside = posixpath.normpath(output_dir)
    if inside != mount_path.rstrip("/") and not inside.startswith(mount_path.rstrip("/") + "/"):
        raise ConfigError(f"output_dir={output_dir} is not under the PVC mount {mount_path}: checkpoints "
                          "would vanish with the pod; use a relative output_dir or one under --mount-path")
    return inside


def _container(name: str, image: str, resources: dict, mount_path: str, ports: list[dict] | None = None) -> dict:
    container = {
        "name": name,
        "image": image,
        "env": [{"name": k, "value": v} for k, v in ACTOR_ENV.items()],
        "resources": resources,
        "volumeMounts": [{"name": "outputs", "mountPath": mount_path},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if ports:
        container["ports"] = ports
    return container


def _pod_template(container: dict, pvc: str) -> dict:
    return {"spec": {
        "containers": [container],
        "volumes": [
            {"name": "outputs", "persistentVolumeClaim": {"claimName": pvc}},
            # Ray's object store lives in /dev/shm; the container default (64 MiB) is too small.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }}


def render_manifest(cfg: RunConfig, overrides: list[str], opts: K8sOptions, needs: JobNeeds) -> dict:
    check_fits(needs, ClusterShape(opts.workers, opts.gpus_per_worker, opts.cpus_per_worker),
               hint=" (--workers, --gpus-per-worker, --cpus-per-worker)")
    if not _NAME.fullmatch(opts.name) or len(opts.name) > _MAX_NAME:
        raise ConfigError(f"--name must be lowercase letters, digits and '-', at most {_MAX_NAME} long; got {opts.name!r}")
    if not opts.image:
        raise ConfigError("--image is required: a container image with rlpost installed")
    output_dir = pod_output_dir(cfg.output_dir, opts.mount_path)
    entrypoint = shell_line(train_argv(pin(overrides, output_dir=output_dir, ray__address="auto")))

    head_res = {"cpu": str(opts.head_cpus), "memory": opts.head_memory}
    worker_res = {"cpu": str(opts.cpus_per_worker), "memory": opts.memory_per_worker}
    worker_limits = dict(worker_res)
    if opts.gpus_per_worker > 0:
        worker_limits["nvidia.com/gpu"] = str(opts.gpus_per_worker)  # GPUs go in limits
    head = _container("ray-head", opts.image, {"requests": head_res, "limits": dict(head_res)}, opts.mount_path,
                      ports=[{"containerPort": 6379, "name": "gcs-server"},
                             {"containerPort": 8265, "name": "dashboard"},
                             {"containerPort": 10001, "name": "client"}])
    worker = _container("ray-worker", opts.image, {"requests": worker_res, "limits": worker_limits}, opts.mount_path)
    cluster = {
        # The head runs the driver only; every actor lands on a worker.
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                          "template": _pod_template(head, opts.pvc)},
        "workerGroupSpecs": [{
            "groupName": "workers", "replicas": opts.workers,
            "minReplicas": opts.workers, "maxReplicas": opts.workers,
            # Logical CPUs = one per actor; Ray reads the GPU count from the pod limits.
            "rayStartParams": {"num-cpus": str(opts.cpus_per_worker)},
            "template": _pod_template(worker, opts.pvc),
        }],
    }
    if opts.ray_version:
        cluster = {"rayVersion": opts.ray_version, **cluster}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": opts.name, "namespace": opts.namespace,
                     "labels": {"app.kubernetes.io/name": "rlpost"}},
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": opts.ttl_seconds,
            "rayClusterSpec": cluster,
        },
    }


def to_yaml(manifest: dict) -> str:
    return yaml.safe_dump(manifest, sort_keys=False)


def submit(manifest: dict, kubeconfig: str | None = None, context: str | None = None) -> dict:
    """Create the RayJob with the cluster's API (kubeconfig, or in-cluster config)."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise ConfigError("--submit for k8s needs the kubernetes client: pip install 'rlpost[launch]'") from None
    try:
        if kubeconfig or os.path.exists(os.path.expanduser("~/.kube/config")) or "KUBECONFIG" in os.environ:
            config.load_kube_config(config_file=kubeconfig, context=context)
        else:
            config.load_incluster_config()
    except config.ConfigException as err:
        raise ConfigError(f"no usable Kubernetes config: {err}") from None
    meta = manifest["metadata"]
    try:
        created = client.CustomObjectsApi().create_namespaced_custom_object(
            group="ray.io", version="v1", namespace=meta["namespace"], plural="rayjobs", body=manifest)
    except client.ApiException as err:
        raise WorkerError(f"creating RayJob {meta['namespace']}/{meta['name']} failed: "
                          f"{err.status} {err.reason}: {err.body}") from None
    print(f"rlpost: created RayJob {meta['namespace']}/{meta['name']}; "
          f"`kubectl get rayjob -n {meta['namespace']} {meta['name']}` shows its status")
    return created
