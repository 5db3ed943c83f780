"""What a run needs from a cluster, derived from its config, and the check that a
requested cluster can hold it. Every target calls ``check_fits`` before it renders or
submits anything, so a job that could never be scheduled fails here, not after an
hour in a queue."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlpost.algorithms import make_algorithm
from rlpost.config.schema import RunConfig
from rlpost.errors import ConfigError
from rlpost.workers.cluster import logical_cpus_needed
from rlpost.workers.placement import gpus_of


@dataclass(frozen=True)
class JobNeeds:
    """Ray resources the run's actors ask for: ``trainer.gpus_per_rank`` per trainer
    (and critic) rank and ``rollout.gpus_per_replica`` per replica (``auto``: one when the
    cluster has GPUs), rounded up; one logical CPU per actor."""

    gpus: int
    cpus: int


@dataclass(frozen=True)
class ClusterShape:
    """Nodes (Slurm nodes or worker pods) that run actors, each alike."""

    nodes: int
    gpus_per_node: int
    cpus_per_node: int  # logical CPUs Ray advertises on each node


def job_needs(cfg: RunConfig, with_gpus: bool) -> JobNeeds:
    """``with_gpus``: whether the cluster will declare GPUs, which is what the ``auto``
    GPU counts resolve against at run time (``rlpost.workers.placement.gpus_of``)."""
    have = 1.0 if with_gpus else 0.0
    critic = cfg.trainer.world_size if make_algorithm(cfg.algorithm).needs_critic else 0  # PPO's critic ranks
    if cfg.rollout.colocate:  # one whole GPU per trainer rank, shared with its replica
        gpus = cfg.trainer.world_size if with_gpus else 0
    else:
        gpus = (cfg.trainer.world_size * gpus_of(cfg.trainer.gpus_per_rank, have)
                + cfg.rollout.replicas * gpus_of(cfg.rollout.gpus_per_replica, have))
    gpus += critic * gpus_of(cfg.critic.gpus_per_rank, have)
    return JobNeeds(gpus=math.ceil(gpus), cpus=logical_cpus_needed(cfg))


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
            f"the run needs {needs.gpus} GPUs (trainer.world_size x trainer.gpus_per_rank + rollout.replicas x "
            f"rollout.gpus_per_replica) but the cluster "
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
