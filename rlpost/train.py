"""Entry point: ``python -m rlpost.train +recipe=grpo_math [key=value ...]``.

Composes and validates the config (nothing starts if it is wrong), builds the
components on a Ray cluster, runs the controller, exports ``final/``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import logging
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

from rlpost.config.convert import to_dict
from rlpost.config.load import load_config
from rlpost.config.schema import RunConfig
from rlpost.errors import Preempted, RlpostError

log = logging.getLogger("rlpost")
_IMPORTED = time.perf_counter()  # about when the command started: start-up is reported from here


def cache_root() -> Path:
    return Path(os.environ.get("RLPOST_CACHE", Path.home() / ".cache" / "rlpost"))


def run(cfg: RunConfig) -> dict:
    """Train according to ``cfg``; returns the metrics of the last step."""
    # Only what starting Ray needs is imported before it starts: torch and the modules
    # that use it load in the background thread and then here, while Ray comes up.
    from rlpost.checkpoint import CheckpointManager, read_state, resolve_resume
    from rlpost.data import prompt_cache
    from rlpost.data.dataset import load_prompts
    from rlpost.models.loading import load_tokenizer, resolve_model_path
    from rlpost.workers.cluster import cluster_terminator, start_cluster, stop_cluster

    # The built-in model is built once with its own fixed seed, not the run seed: a
    # different run seed should not cost a rebuild.
    model_path = resolve_model_path(cfg.model.path)
    if cfg.env.agent is not None:  # a bad path stops the run now, not after Ray and the actors start
        from rlpost.envs.agent import load_agent_fn, resolve_agent_spec

        load_agent_fn(resolve_agent_spec(cfg.env.agent))
    _resolve_threads(cfg)
    out = Path(cfg.output_dir).resolve()  # absolute: actors on other nodes get this path
    out.mkdir(parents=True, exist_ok=True)
    print(f"rlpost: run directory {out}; threads per trainer rank {cfg.trainer.threads}, per rollout "
          f"replica {cfg.rollout.threads}", flush=True)

    checkpoints = CheckpointManager(out / "checkpoints", cfg.trainer.keep_last)
    resume_from = resolve_resume(cfg.resume, checkpoints)
    state = read_state(resume_from) if resume_from else None
    if state and state.step >= cfg.trainer.total_steps and (out / "final").is_dir():
        print(f"rlpost: {out} already finished {state.step} steps; nothing to do", flush=True)
        return {}

    # Start-up order (docs/architecture.md, "Start-up"): what the driver needs only later
    # is built in background threads while Ray and the actors start; the actors are
    # created before anything waits for one, the trainer first (its start is the longest).
    clock = _StartClock()
    data_dir = cache_root() / "data"

    def load_data():
        # A cache hit loads no tokenizer on the driver (rlpost.data.prompt_cache says why).
        key = prompt_cache.cache_key(cfg.data, model_path, cfg.seed, data_dir)
        loaded = prompt_cache.load(cache_root() / "prompts", key)
        if loaded is None:
            tokenizer = load_tokenizer(model_path)
            train, train_report = load_prompts(cfg.data, tokenizer, "train", seed=cfg.seed, data_dir=data_dir)
            val, val_report = load_prompts(cfg.data, tokenizer, "val", seed=cfg.seed, data_dir=data_dir)
            loaded = (tokenizer.pad_token_id, train, train_report, val, val_report)
            prompt_cache.save(cache_root() / "prompts", key, loaded)
        pad_id, train, train_report, val, val_report = loaded
        clock.mark("prompts")
        print(f"rlpost: train data {train_report.summary()}; val data {val_report.summary()}", flush=True)
        return pad_id, train, val

    # One thread, one job after the other: the work holds the GIL anyway, and two threads
    # importing transformers at once can see it half-initialised ("cannot import name").
    background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlpost-start")
    data = background.submit(load_data)
    n_params = background.submit(_matmul_params, cfg, model_path)  # the meta-device model, or its cached count
    # Timed while Ray starts: on a busy core it reads low, which the best-ever cache absorbs.
    cpu_peak = background.submit(_cpu_peak)
    background.shutdown(wait=False)

    try:
        started = start_cluster(cfg)
    except BaseException:
        _cancel(data, n_params, cpu_peak)
        raise
    clock.mark("Ray")
    # After ray.init, which may install its own; a second Ctrl-C ends the Ray instance we started.
    stop_flag = _install_stop_handlers(cluster_terminator() if started else lambda: None)
    groups = []
    launched = []  # the first trainer group, started early; the supervisor takes it
    tracker = None
    try:
        import torch

        from rlpost.algorithms import make_algorithm
        from rlpost.step.controller import Controller
        from rlpost.data.stream import PromptStream
        from rlpost.engines import resolve_rollout_engine
        from rlpost.faults import FaultCounts
        from rlpost.step.supervisor import TrainerParts, TrainerSupervisor
        from rlpost.tracking import Tracker
        from rlpost.workers.placement import resolve_placement
        from rlpost.workers.reward_pool import RewardPool
        from rlpost.workers.rollout_group import RolloutGroup
        from rlpost.workers.trainer_group import TrainerGroup
        from rlpost.workers.weight_sync_link import WeightSyncLink

        torch.set_num_threads(1)
        algorithm = make_algorithm(cfg.algorithm)  # what the run needs: reference, critic
        use_reference = algorithm.needs_reference
        # GPU counts from the cluster (never the driver's hardware), so config.yaml and
        # the tracker record what the actors asked for.
        accelerator = resolve_placement(cfg)
        # auto -> vllm or hf, decided here once (by the model's size on CPU replicas), so
        # every replica runs the same engine and config.yaml records the one that ran.
        cfg.rollout.engine = resolve_rollout_engine(cfg.rollout.engine, model_path,
                                                    gpu=bool(cfg.rollout.gpus_per_replica))
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(f"rlpost: placement: trainer {cfg.trainer.gpus_per_rank} GPU/rank, rollout "
              f"{cfg.rollout.gpus_per_replica} GPU/replica; rollout engine {cfg.rollout.engine}", flush=True)
        peak = _peak(cfg, accelerator, cpu_peak)
        faults = FaultCounts()  # failures survived (replaced actors, trainer rebuilds), logged every step
        placement = None
        if cfg.rollout.colocate:  # GPU only: trainer rank i and replica i share GPU i
            from rlpost.workers.colocation import ColocatedPlacement

            placement = ColocatedPlacement(cfg.trainer.world_size)
            groups.append(placement)  # shut down last: after every actor placed in it
        launched.append(TrainerGroup(cfg, model_path, with_reference=use_reference, placement=placement))
        rollout = RolloutGroup(cfg, model_path, faults, placement=placement)
        groups.append(rollout)
        rewards = RewardPool(cfg.reward, faults)
        groups.append(rewards)
        envs = agents = None
        if cfg.env.agent is not None:  # user agents in their own actors, through the gateway
            from rlpost.workers.agent_pool import AgentPool

            agents = AgentPool(cfg.env, faults)
            groups.append(agents)
        elif cfg.env.enabled(cfg.rollout):  # multi-turn episodes: environments in their own actors
            from rlpost.rollout.multiturn import env_factory
            from rlpost.workers.env_pool import EnvPool

            envs = EnvPool(cfg.env, *env_factory(cfg), faults)
            groups.append(envs)
        tracker = Tracker(cfg.logger, out, cfg.trainer.total_steps, to_dict(cfg))
        # Asked for when the first controller is made, so the trainer need not wait for it.
        step_perf = functools.cache(lambda: _step_perf(cfg, n_params.result(), *peak))

        # The trainer group, its weight-sync link and PPO's critic are built (and, after
        # a trainer or critic rank dies, rebuilt) by the supervisor; see rlpost.step.supervisor.
        def build_trainer() -> TrainerParts:
            trainer = launched.pop() if launched else TrainerGroup(cfg, model_path, with_reference=use_reference,
                                                                   placement=placement)
            critic = None
            try:
                trainer.wait_ready()
                clock.mark("trainer")
                trainer.check_run_dir(out)  # checkpoints need a filesystem the driver shares
                # Waited for only now (no time limit: vLLM on a busy machine can take
                # minutes), so the replicas loaded while the trainer did.
                print(f"rlpost: rollout replica pids {rollout.pids()}", flush=True)
                clock.mark("rollout")
                if placement is not None:  # CUDA IPC through vLLM's weight-transfer engine
                    from rlpost.workers.colocation import ColocatedWeightSync

                    weight_sync = ColocatedWeightSync(trainer, rollout, cfg.weight_sync.timeout_s)
                    trainer.before_compute = weight_sync.phases.to_train
                    rollout.before_generate = weight_sync.phases.to_rollout
                else:
                    weight_sync = WeightSyncLink(trainer, rollout, cfg.weight_sync.timeout_s)
                clock.mark("weight sync")
                print(f"rlpost: trainer rank pids {trainer.pids()}", flush=True)
                if algorithm.needs_critic:  # PPO: the value model in its own actors
                    from rlpost.workers.critic_group import CriticGroup

                    critic = CriticGroup(cfg, model_path)
                    print(f"rlpost: critic rank pids {critic.pids()}", flush=True)
            except BaseException:
                TrainerParts(trainer, None, critic).kill()
                raise
            return TrainerParts(trainer, weight_sync, critic)

        def make_controller(parts: TrainerParts) -> Controller:
            pad_id, train, val = data.result()
            print(f"rlpost: components ready {time.perf_counter() - _IMPORTED:.1f}s after start "
                  f"({clock.describe()})", flush=True)
            stream = PromptStream(train, cfg.data.train_batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
            return Controller(cfg, trainer=parts.trainer, rollout=rollout, rewards=rewards,
                              weight_sync=parts.weight_sync, stream=stream,
                              val_samples=val, tracker=tracker, checkpoints=checkpoints,
                              pad_id=pad_id, use_reference=use_reference, envs=envs,
                              critic=parts.critic, faults=faults, perf=step_perf(), agents=agents)

        supervisor = TrainerSupervisor(build_trainer=build_trainer, make_controller=make_controller,
                                       checkpoints=checkpoints, tracker=tracker,
                                       max_restarts=cfg.trainer.max_restarts, faults=faults,
                                       # Overlapped modes keep a sampling thread running through a rebuild.
                                       no_rebuild_reason=None if cfg.trainer.mode == "sync" else
                                       f"that needs trainer.mode=sync (this run: {cfg.trainer.mode})")
        groups.append(supervisor)
        last = supervisor.run(resume_from, stop_flag.is_set,
                              finish=lambda trainer: trainer.export_hf(str(out / "final"), model_path))
        tracker.message(f"rlpost: final policy exported to {out / 'final'}")
        return last
    finally:
        _cancel(data, n_params, cpu_peak)
        if tracker is not None:
            tracker.close()
        for trainer in launched:  # started but never handed to the supervisor
            trainer.kill()
        for group in reversed(groups):
            group.shutdown()
        stop_cluster(started)


class _StartClock:
    """Seconds from the command's start to each start-up milestone, for the
    "components ready" line (how long each part took to be there)."""

    def __init__(self):
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter() - _IMPORTED

    def describe(self) -> str:
        return ", ".join(f"{name} at {t:.1f}s" for name, t in sorted(self.marks.items(), key=lambda kv: kv[1]))


def _cancel(*futures: concurrent.futures.Future) -> None:
    """Cancel start-up work not begun yet; work already running finishes in its thread."""
    for future in futures:
        future.cancel()


def _cpu_peak() -> tuple[float, str]:
    from rlpost.perf import measure_cpu_peak_cached

    return measure_cpu_peak_cached(cache_root() / "perf")


def _matmul_params(cfg: RunConfig, model_path: str) -> int:
    from rlpost.perf import matmul_params_cached

    return matmul_params_cached(model_path, cfg.model.trust_remote_code, cache_root() / "perf")


def _peak(cfg: RunConfig, accelerator: str | None, cpu_peak) -> tuple[float, str, int]:
    """(peak FLOP/s, how it was found, GPUs in use) for perf/mfu (rlpost.perf), from the
    GPUs the placement gave the actors and the cluster's accelerator type, not from
    the driver's hardware; ``cpu_peak``: the background measurement of the cores."""
    from rlpost.perf import peak_flops

    gpus = cfg.trainer.world_size * (cfg.trainer.gpus_per_rank > 0)
    if not cfg.rollout.colocate:
        gpus += cfg.rollout.replicas * (cfg.rollout.gpus_per_replica > 0)
    return (*peak_flops(cache_root() / "perf", gpus, accelerator, cpu_peak.result()), gpus)


def _step_perf(cfg: RunConfig, n_params: int, peak: float, how: str, gpus: int):
    """perf/mfu's parameter count and peak (rlpost.perf), said once."""
    from rlpost.perf import StepPerf, cpu_has_bf16

    print(f"rlpost: perf/mfu = model FLOPs / (step time x peak); N = {n_params / 1e6:.2f}M matmul parameters, "
          f"peak: {how}", flush=True)
    if not gpus and not cpu_has_bf16():
        note = ("model.dtype=bfloat16 will be emulated, several times slower: set model.dtype=float32"
                if cfg.model.dtype == "bfloat16" else "computing in float32")
        print(f"rlpost: this CPU has no bf16 units (AVX512-BF16/AMX); {note}", flush=True)
    return StepPerf(n_params=n_params, peak=peak, devices=max(gpus, 1))


def _resolve_threads(cfg: RunConfig) -> None:
    """``trainer.threads`` / ``rollout.threads`` = 0 (auto) -> counts from this node's
    cores, ``OMP_NUM_THREADS`` and the schedule (rlpost.threads), written into the
    config that actors read and config.yaml records."""
    from rlpost.threads import env_thread_cap, resolve_threads

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cfg.trainer.threads, cfg.rollout.threads = resolve_threads(
        cfg.trainer.mode, cpus, cfg.trainer.world_size, cfg.rollout.replicas, cfg.trainer.threads, cfg.rollout.threads,
        cap=env_thread_cap())


def _install_stop_handlers(kill_cluster) -> threading.Event:
    """SIGTERM (Slurm preemption, Kubernetes eviction) and a first Ctrl-C (SIGINT) set
    a flag the controller polls between steps, instead of killing the run mid-update:
    the step in flight finishes, a checkpoint is written and ``Preempted`` is raised.
    A second Ctrl-C exits at once without a checkpoint (exit code 130), after
    ``kill_cluster()`` ends the Ray processes this run started."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return flag

    def on_term(signum, frame):
        print("rlpost: SIGTERM received; finishing the current step, then checkpointing", flush=True)
        flag.set()

    def on_int(signum, frame):
        if flag.is_set():
            print("\nrlpost: second Ctrl-C: stopping now, without a checkpoint", file=sys.stderr, flush=True)
            kill_cluster()
            os._exit(INTERRUPTED_EXIT_CODE)
        print("\nrlpost: Ctrl-C: finishing the current step, then checkpointing "
              "(press Ctrl-C again to stop at once, without a checkpoint)", file=sys.stderr, flush=True)
        flag.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)
    return flag


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command


def resume_command(overrides: list[str], output_dir: str) -> str:
    """The command that continues a stopped run: the same overrides, its run
    directory named explicitly (a default one is a timestamp) and ``resume=auto``."""
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("output_dir=", "resume="))]
    return shlex.join(["python", "-m", "rlpost.train", *keep,
                       f"output_dir={output_dir}", "resume=auto"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlpost.train",
        description="RL post-training. Give Hydra overrides, e.g. +recipe=grpo_math trainer.total_steps=40",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value, +recipe=NAME)")
    parser.add_argument("--cfg", action="store_true", help="print the composed, validated config and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.overrides)
        if args.cfg:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        run(cfg)
    except Preempted as err:
        print(f"rlpost: {err}\nrlpost: to continue: {resume_command(args.overrides, cfg.output_dir)}",
              file=sys.stderr)
        return Preempted.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the stop handlers were installed (config, data, start-up)
        print("\nrlpost: interrupted before training started; nothing to checkpoint", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except RlpostError as err:
        print(f"rlpost: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
