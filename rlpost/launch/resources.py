"""What a run needs from a cluster, derived from its config, and the check that a
requested cluster can hold it. Every target calls ``check_fits`` before it renders or
submits anything, so a job that could never be scheduled fails here, not after an
hour in a queue."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlpost.config.schema import RunConfig
from rlpost.errors import ConfigError
from rlpost.workers.cluster import logical_cpus_needed


@dataclass(frozen=True)
class JobNeeds:
    """Ray resources the run's actors ask for: one GPU per trainer rank and per rollout
    replica (only when the cluster has GPUs), one logical CPU per actor."""

    gpus: int
    cpus: int


@dataclass(frozen=True)
class ClusterShape:
    """Nodes (Slurm nodes or worker pods) that run actors, each alike."""

    nodes: int
    gpus_per_node: int
    cpus_per_node: int  # logical CPUs Ray advertises on each node


def job_needs(cfg: RunConfig, with_gpus: bool) -> JobNeeds:
    critic = cfg.trainer.world_size if cfg.algorithm.adv_estimator == "gae" else 0  # PPO's critic ranks
    # rollout.colocate: each replica shares its trainer rank's GPU.
    rollout = 0 if cfg.rollout.colocate else cfg.rollout.replicas
    gpus = cfg.trainer.world_size + critic + rollout if with_gpus else 0
    return JobNeeds(gpus=gpus, cpus=logical_cpus_needed(cfg))


def nodes_for(needs: JobNeeds, gpus_per_node: int) -> int:
    """Fewest nodes whose GPUs hold every GPU actor (1 when the run is CPU-only)."""
    return max(1, math.ceil(needs.gpus / gpus_per_node)) if gpus_per_node > 0 else 1


def cpus_per_node_for(needs: JobNeeds, nodes: int) -> int:
    return max(1, math.ceil(needs.cpus / nodes))


def check_fits(needs: JobNeeds, shape: ClusterShape, hint: str = "") -> None:
    """Raise ``ConfigError`` naming the numbers when ``shape`` cannot hold ``needs``."""
    if shape.nodes < 1 or shape.cpus_per_node < 1 or shape.gpus_per_node < 0:
        raise ConfigError(f"a cluster needs nodes >= 1, cpus per node >= 1 and gpus per node >= 0; got "
                          f"{shape.nodes}, {shape.cpus_per_node} and {shape.gpus_per_node}")
    have_gpus = shape.nodes * shape.gpus_per_node
    if needs.gpus > have_gpus:
        raise ConfigError(
            f"the run needs {needs.gpus} GPUs (trainer.world_size + rollout.replicas) but the cluster "
            f"has {shape.nodes} nodes x {shape.gpus_per_node} GPUs = {have_gpus}; "
            f"ask for more nodes/GPUs or lower trainer.world_size / rollout.replicas{hint}"
        )
    have_cpus = shape.nodes * shape.cpus_per_node
    if needs.cpus > have_cpus:
        raise ConfigError(
            f"the run needs {needs.cpus} logical CPUs (one per trainer rank, rollout replica and "
            f"reward worker) but the cluster has {shape.nodes} nodes x {shape.cpus_per_node} CPUs = "
            f"{have_cpus}; ask for more CPUs per node or lower reward.workers{hint}"
        )
