"""Where actors run, decided by the config and the Ray cluster, never by the driver's
hardware (a KubeRay head pod or a Slurm batch node is often CPU-only).

- ``resolve_gpus``: every ``auto`` GPU count (``trainer.gpus_per_rank``,
  ``rollout.gpus_per_replica``, ``critic.gpus_per_rank``) becomes 1 when the cluster
  declares GPU resources, else 0. Called once after the cluster is up; ``config.yaml``
  records the numbers that ran.
- ``GroupPlacement``: one Ray placement group per group of actors, one bundle per actor
  (1 CPU, its GPUs, its custom ``resources``), with the group's strategy (trainer
  ranks ``pack``: few nodes, fast collectives; replicas ``spread``). Custom resources
  pin a group to the nodes that declare them.
- ``actor_device``: inside an actor, the device Ray assigned it. An actor given a GPU
  that finds no usable CUDA stops with a ``WorkerError`` naming its node.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlpost.config.schema import RunConfig
from rlpost.errors import WorkerError
from rlpost.workers.cluster import creation_error, describe_resources, node_ip


def gpus_of(value: int | float | str, cluster_gpus: float) -> int | float:
    """A GPU-count key's value on a cluster declaring ``cluster_gpus`` GPUs in all:
    ``auto`` is 1 when it declares any, else 0; a number is itself."""
    if value == "auto":
        return 1 if cluster_gpus > 0 else 0
    return value


def resolve_gpus(cfg: RunConfig, cluster_gpus: float) -> None:
    """Replace each ``auto`` GPU count in ``cfg`` (in place) by ``gpus_of`` it, with
    ``cluster_gpus`` from ``ray.cluster_resources()``."""
    for section, key in ((cfg.trainer, "gpus_per_rank"), (cfg.rollout, "gpus_per_replica"),
                         (cfg.critic, "gpus_per_rank")):
        setattr(section, key, gpus_of(getattr(section, key), cluster_gpus))


def resolve_placement(cfg: RunConfig) -> str | None:
    """``resolve_gpus`` from the running cluster's declared resources; returns the
    cluster's GPU model as Ray reports it (its ``accelerator_type:<name>`` resource,
    e.g. "H100"), None without one."""
    resources = ray.cluster_resources()
    resolve_gpus(cfg, resources.get("GPU", 0.0))
    types = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    return types[0] if types else None


@dataclass
class GroupPlacement:
    """A placement group of ``count`` alike bundles; ``options(i)`` puts an actor in
    bundle ``i`` (a replacement actor goes back into its predecessor's bundle)."""

    what: str
    group: PlacementGroup
    gpus: float
    resources: dict

    @classmethod
    def create(cls, what: str, count: int, gpus: int | float | str, resources: dict | None, strategy: str,
               timeout_s: float) -> "GroupPlacement":
        resources = dict(resources or {})
        gpus = gpus_of(gpus, ray.cluster_resources().get("GPU", 0.0))  # a config not resolved by train.run
        bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {}), **resources}
        group = placement_group([bundle] * count, strategy=strategy.upper())
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(group)
            raise WorkerError(
                f"{what}: Ray could not place {count} x {bundle} ({strategy}) within ray.placement_timeout_s="
                f"{timeout_s:.0f}s; the cluster has {{{describe_resources(ray.cluster_resources())}}} in all and "
                f"{{{describe_resources(ray.available_resources())}}} free. Add nodes, or lower the GPU counts / "
                "resources (trainer.gpus_per_rank, rollout.gpus_per_replica, *.resources)")
        return cls(what, group, gpus, resources)

    def options(self, index: int) -> dict:
        return {"num_cpus": 1, "num_gpus": self.gpus, "resources": self.resources,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=index)}

    def shutdown(self) -> None:
        """Give the bundles back (kills any actor still in them)."""
        remove_placement_group(self.group)


def actor_device(what: str) -> torch.device:
    """The device of the calling actor: ``cuda:0`` when Ray assigned it a GPU (Ray sets
    CUDA_VISIBLE_DEVICES to that GPU, so it is the first visible one), else the CPU.
    An actor without a GPU stays on the CPU even on a GPU node, where it would
    otherwise see every GPU (call this before anything initialises CUDA). Raises
    ``WorkerError`` naming the node when Ray assigned a GPU that torch cannot use."""
    gpu_ids = ray.get_gpu_ids()
    if not gpu_ids:
        # Ray leaves CUDA_VISIBLE_DEVICES alone for an actor without GPUs; hide them so
        # no library in this process (DeepSpeed's accelerator, NCCL) picks one up.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return torch.device("cpu")
    if not torch.cuda.is_available():
        node = f"{socket.gethostname()} ({node_ip()})"
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise WorkerError(
            f"{what} was given GPU {gpu_ids} by Ray on node {node}, but torch finds no usable CUDA device "
            f"there (torch {torch.__version__} is {build}). On that node check `nvidia-smi`, the NVIDIA "
            "driver, that torch is a CUDA build, and that `ray start --num-gpus` declares only real GPUs; "
            "or run this group on CPU with trainer.gpus_per_rank=0 / rollout.gpus_per_replica=0 / "
            "critic.gpus_per_rank=0")
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):  # every GPU visible: pick ours by id
        return torch.device("cuda", int(gpu_ids[0]))
    return torch.device("cuda", 0)


def backend_for(device: torch.device) -> str:
    """torch.distributed backend of a group whose ranks live on ``device``."""
    return "nccl" if device.type == "cuda" else "gloo"


def started_devices(actors: list, what: str, refs: list | None = None) -> list[str]:
    """Ask every actor for its device (``actor.device()``; ``refs``: those calls, made
    already) once it has started: the start-up check in ``actor_device`` surfaces here
    as a ``WorkerError`` with the actor's own message, not as a lost rank to rebuild.
    No time limit: an engine may take minutes to load; a failing actor answers at once."""
    try:
        return ray.get(refs if refs is not None else [a.device.remote() for a in actors])
    except ray.exceptions.RayTaskError as err:  # raised by device()
        raise WorkerError(f"{what}: {err.cause}") from None
    except ray.exceptions.RayActorError as err:  # died in __init__
        raise WorkerError(f"{what} failed to start: {creation_error(err)}") from None
