"""How many math threads each trainer rank and rollout replica runs on a CPU node.

The rule (``trainer.threads`` / ``rollout.threads`` = 0, "auto"), over the node's
*free* cores: its cores less those other programs kept busy when the run started (the
one-minute load average, less this process's own start). Math threads on a core some
other process is using do not add speed, they wait at every barrier for the slowest
(on a 2-core machine under a load average of about 16, 24M-parameter steps took 189 and
345 s with two threads against 70-80 s with one minutes earlier; docs/performance.md),
so a busy node gets one thread per process.

- ``trainer.mode=sync``: sampling, then training, then the weight push; the trainer
  and the replicas take turns, so while one computes the other waits. Each side gets
  the whole node: a trainer rank ``cpus // trainer.world_size`` threads, a replica
  ``cpus // rollout.replicas`` (PPO's critic ranks, which also wait their turn, as
  many as a trainer rank).
- ``one_step_off`` / ``async``: sampling and training run at the same time, so the node
  is split: half the cores to the trainer ranks, the rest to the replicas (at least one
  thread each). Two processes that both use every core at once run slower than two
  that share them (oversubscription; see docs/platform notes).

A number > 0 is taken as is (threads per trainer rank, or per replica). Reward workers,
environments and the driver keep one thread: they do little math. Resolved once, in
``rlpost.train``, into the config that ``config.yaml`` records.
"""

from __future__ import annotations


def resolve_threads(mode: str, cpus: int, trainer_ranks: int, replicas: int,
                    trainer_threads: int = 0, rollout_threads: int = 0, cap: int | None = None) -> tuple[int, int]:
    """(threads per trainer rank, threads per rollout replica); 0 = auto (module
    docstring). ``cap``: the most auto gives one process (``env_thread_cap``)."""
    cpus = max(cpus, 1)
    if mode == "sync":
        trainer_share, rollout_share = cpus, cpus
    else:
        trainer_share = max(cpus // 2, 1)
        rollout_share = max(cpus - trainer_share, 1)
    limit = cap if cap and cap > 0 else cpus
    trainer = trainer_threads or min(max(trainer_share // trainer_ranks, 1), limit)
    rollout = rollout_threads or min(max(rollout_share // replicas, 1), limit)
    return trainer, rollout


def env_thread_cap() -> int | None:
    """``OMP_NUM_THREADS`` of this (the driver's) environment, when set to a number."""
    import os

    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None
