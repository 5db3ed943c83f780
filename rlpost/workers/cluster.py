"""Start or join the Ray cluster, and the small helpers actors share."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable, Iterator

import ray

from rlpost.algorithms import make_algorithm
from rlpost.config.schema import RunConfig
from rlpost.errors import WorkerError

# Environment every actor gets: one math thread per process (2 cores oversubscribe
# fast), no tokenizer thread pools, and offline hubs unless the user set otherwise.
ACTOR_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_AUTH_MODE": "disabled",
    # vLLM logs every engine start and weight reload at INFO, once per replica.
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def quiet_actor_logs() -> None:
    """Per-actor model loading bars would interleave in the driver's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def logical_cpus_needed(cfg: RunConfig) -> int:
    critic = cfg.trainer.world_size if make_algorithm(cfg.algorithm).needs_critic else 0  # PPO's critic ranks
    return cfg.trainer.world_size + critic + cfg.rollout.replicas + cfg.reward.workers


def start_cluster(cfg: RunConfig) -> bool:
    """Join ``cfg.ray.address`` or start a local cluster. Returns True when this call
    started Ray (and so must shut it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {k: os.environ.get(k, v) for k, v in ACTOR_ENV.items()}
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "RLPOST_CACHE", "WANDB_MODE", "PYTHONPATH",
                "RLPOST_SANDBOX_TOKEN"):  # env actors' sandbox clients send it
        if key in os.environ:
            env[key] = os.environ[key]
    if cfg.ray.address:
        # Joining a cluster (possibly from inside a Ray job, whose runtime env Ray
        # refuses to have overridden): actors pin their own threads in __init__.
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        # Logical CPUs may exceed cores: actors mostly wait on each other, and each is
        # pinned to one thread, so one CPU slot per actor is what we need.
        num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, logical_cpus_needed(cfg))
        # address="local": always a new instance of our own. With address=None Ray
        # joins whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster (left by any `ray
        # start` on this machine, even a killed one) points at, and then refuses num_cpus.
        # The actors' environment is the environment the Ray processes start with (workers
        # inherit the raylet's), not a job runtime_env: with one, the workers Ray starts
        # ahead for the driver cannot serve the actors (their runtime env differs), so every
        # actor waited for a fresh process while those burnt CPU (docs/performance.md).
        with _environ(env):
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                     configure_logging=False)
    how = "joined" if cfg.ray.address else "started"
    print(f"rlpost: {how} Ray cluster at {ray.get_runtime_context().gcs_address} "
          f"({len(ray.nodes())} node(s), {describe_resources(ray.cluster_resources())})", flush=True)
    return True


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``env`` inside the block, restored after it."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def describe_resources(resources: dict) -> str:
    keep = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store"))}
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items()))


def stop_cluster(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()


def cluster_terminator() -> Callable[[], None]:
    """A function that SIGTERMs the local Ray processes this process started (the raylet
    first: it stops its workers and agents; then the GCS and the rest), by pid, without
    calling into Ray, so a signal handler may run it while the main thread is anywhere
    inside Ray (a second Ctrl-C; calling ``ray.shutdown`` there can deadlock on a lock
    the interrupted code holds). A no-op when this process joined a cluster."""
    node = getattr(ray._private.worker, "_global_node", None)  # None when joined or not started
    if node is None or not node.head:
        return lambda: None
    first = ("raylet", "gcs_server")
    kinds = sorted(node.all_processes, key=lambda kind: first.index(kind) if kind in first else len(first))
    pids = [info.process.pid for kind in kinds for info in node.all_processes[kind]]

    def terminate() -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    return terminate


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def node_ip() -> str:
    """Address other actors can reach this node on: loopback on a one-node cluster,
    else the address the node registered with Ray (`ray start --node-ip-address`),
    not the one this process would guess from its network interfaces."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) <= 1:
        return "127.0.0.1"
    me = ray.get_runtime_context().get_node_id()
    return next((n["NodeManagerAddress"] for n in nodes if n["NodeID"] == me), ray.util.get_node_ip_address())


def wait(refs, timeout_s: float | None, what: str, lost: type[WorkerError] = WorkerError):
    """``ray.get`` that turns timeouts into a WorkerError and actor deaths into ``lost``
    (a WorkerError subclass the caller recovers from), both naming the stage."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise WorkerError(f"{what} did not finish within {timeout_s:.0f}s") from None
    except ray.exceptions.RayActorError as err:
        if "error raised in its creation task" in str(getattr(err, "error_msg", "")):
            # It never started (e.g. no usable CUDA where Ray gave it a GPU): another
            # try would fail the same way, so this is not a loss to recover from.
            raise WorkerError(f"{what}: an actor failed to start: {creation_error(err)}") from err
        raise lost(f"{what}: an actor died ({err.__class__.__name__}): {err}") from err


def creation_error(err: Exception) -> str:
    """The ``rlpost.errors`` line of an actor's creation-task traceback, else all of it."""
    text = str(getattr(err, "error_msg", err))
    lines = [line for line in text.splitlines() if line.lstrip().startswith("rlpost.errors.")]
    return lines[-1].strip().split(": ", 1)[-1] if lines else text


# How long to wait for a group's other calls to settle after one failed, to tell a
# dead rank (its peers' collectives reset at once) from an ordinary exception.
_SETTLE_S = 60.0


def wait_ranks(refs, what: str, timeout_s: float | None = None, lost: type[WorkerError] = WorkerError):
    """``wait`` for the calls of one torch.distributed group (trainer or critic ranks):
    raises ``lost`` when a rank died, including when the first error to arrive is a
    surviving rank's collective failing because of that death."""
    try:
        return wait(refs, timeout_s, what, lost=lost)
    except ray.exceptions.RayTaskError as err:
        many = refs if isinstance(refs, list) else [refs]
        if dead_owners(many, _SETTLE_S):
            raise lost(f"{what}: a rank died ({err.__class__.__name__})") from err
        raise


def dead_owners(refs: list, timeout_s: float) -> list[int]:
    """Indices of ``refs`` whose actor died. Waits up to ``timeout_s`` for them to
    settle: after one call of a collective fails, its peers fail quickly too (their
    connections reset), so this tells a dead peer from a task that merely raised."""
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    settled = {ref.hex() for ref in ready}
    dead = []
    for i, ref in enumerate(refs):
        if ref.hex() not in settled:
            continue
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError:
            dead.append(i)
        except Exception:  # the task raised; its actor is alive
            pass
    return dead


# TrainEngine.train_step metrics that are already global (identical on every rank).
_GLOBAL_STEP_METRICS = frozenset({"grad_norm", "lr", "skipped"})


def merge_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One group's ``train_step`` metrics from its ranks': additive ones (the LossFn
    contract) summed over ranks, ``grad_norm``/``lr``/``skipped`` taken once."""
    merged = {k: v for k, v in per_rank[0].items() if k in _GLOBAL_STEP_METRICS}
    for metrics in per_rank:
        for key, value in metrics.items():
            if key not in _GLOBAL_STEP_METRICS:
                merged[key] = merged.get(key, 0.0) + value
    return merged
