"""Entry point: ``python -m rlpost.train +recipe=grpo_math [key=value ...]``.

Composes and validates the config (nothing starts if it is wrong), builds the
components on a Ray cluster, runs the controller, exports ``final/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import yaml

from rlpost.config.convert import to_dict
from rlpost.config.load import load_config
from rlpost.config.schema import RunConfig
from rlpost.errors import Preempted, RlpostError

log = logging.getLogger("rlpost")


def cache_root() -> Path:
    return Path(os.environ.get("RLPOST_CACHE", Path.home() / ".cache" / "rlpost"))


def run(cfg: RunConfig) -> dict:
    """Train according to ``cfg``; returns the metrics of the last step."""
    import torch

    from rlpost.checkpoint import CheckpointManager, read_state, resolve_resume
    from rlpost.controller import Controller
    from rlpost.data.dataset import load_prompts
    from rlpost.data.stream import PromptStream
    from rlpost.faults import FaultCounts
    from rlpost.engines import resolve_rollout_engine
    from rlpost.models.loading import load_tokenizer, resolve_model_path
    from rlpost.supervisor import TrainerParts, TrainerSupervisor
    from rlpost.tracking import Tracker
    from rlpost.workers.cluster import start_cluster, stop_cluster
    from rlpost.workers.reward_pool import RewardPool
    from rlpost.workers.rollout_group import RolloutGroup
    from rlpost.workers.trainer_group import TrainerGroup
    from rlpost.workers.weight_sync_link import WeightSyncLink

    torch.set_num_threads(1)
    # The built-in model is built once with its own fixed seed, not the run seed: a
    # different run seed should not cost a rebuild.
    model_path = resolve_model_path(cfg.model.path)
    # auto -> vllm or hf, decided here once (by the model's size on CPU), so every replica
    # runs the same engine and config.yaml records the one that ran.
    cfg.rollout.engine = resolve_rollout_engine(cfg.rollout.engine, model_path)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print(f"rlpost: run directory {out.resolve()}; rollout engine {cfg.rollout.engine}", flush=True)

    tokenizer = load_tokenizer(model_path)
    data_dir = cache_root() / "data"
    train, train_report = load_prompts(cfg.data, tokenizer, "train", seed=cfg.seed, data_dir=data_dir)
    val, val_report = load_prompts(cfg.data, tokenizer, "val", seed=cfg.seed, data_dir=data_dir)
    print(f"rlpost: train data {train_report.summary()}; val data {val_report.summary()}", flush=True)

    checkpoints = CheckpointManager(out / "checkpoints", cfg.trainer.keep_last)
    resume_from = resolve_resume(cfg.resume, checkpoints)
    state = read_state(resume_from) if resume_from else None
    if state and state.step >= cfg.trainer.total_steps and (out / "final").is_dir():
        print(f"rlpost: {out} already finished {state.step} steps; nothing to do", flush=True)
        return {}

    use_reference = cfg.algorithm.kl_coef > 0
    started = start_cluster(cfg)
    stop_flag = _install_sigterm_handler()  # after ray.init, which may install its own
    groups = []
    tracker = Tracker(cfg.logger, out, cfg.trainer.total_steps, to_dict(cfg))
    try:
        faults = FaultCounts()  # failures survived (replaced actors, trainer rebuilds), logged every step
        placement = None
        if cfg.rollout.colocate:  # GPU only: trainer rank i and replica i share GPU i
            from rlpost.workers.colocation import ColocatedPlacement

            placement = ColocatedPlacement(cfg.trainer.world_size)
            groups.append(placement)  # shut down last: after every actor placed in it
        rollout = RolloutGroup(cfg, model_path, faults, placement=placement)
        groups.append(rollout)
        rewards = RewardPool(cfg.reward, faults)
        groups.append(rewards)
        envs = None
        if cfg.env.enabled(cfg.rollout):  # multi-turn episodes: environments in their own actors
            from rlpost.multiturn import env_factory
            from rlpost.workers.env_pool import EnvPool

            envs = EnvPool(cfg.env, *env_factory(cfg), faults)
            groups.append(envs)
        print(f"rlpost: rollout replica pids {rollout.pids()}", flush=True)

        # The trainer group, its weight-sync link and PPO's critic are built (and, after
        # a trainer or critic rank dies, rebuilt) by the supervisor; see rlpost.supervisor.
        def build_trainer() -> TrainerParts:
            trainer = TrainerGroup(cfg, model_path, with_reference=use_reference, placement=placement)
            critic = None
            try:
                if placement is not None:  # CUDA IPC through vLLM's weight-transfer engine
                    from rlpost.workers.colocation import ColocatedWeightSync

                    weight_sync = ColocatedWeightSync(trainer, rollout, cfg.weight_sync.timeout_s)
                    trainer.before_compute = weight_sync.phases.to_train
                    rollout.before_generate = weight_sync.phases.to_rollout
                else:
                    weight_sync = WeightSyncLink(trainer, rollout, cfg.weight_sync.timeout_s)
                print(f"rlpost: trainer rank pids {trainer.pids()}", flush=True)
                if cfg.algorithm.adv_estimator == "gae":  # PPO: the value model in its own actors
                    from rlpost.workers.critic_group import CriticGroup

                    critic = CriticGroup(cfg, model_path)
                    print(f"rlpost: critic rank pids {critic.pids()}", flush=True)
            except BaseException:
                TrainerParts(trainer, None, critic).kill()
                raise
            return TrainerParts(trainer, weight_sync, critic)

        def make_controller(parts: TrainerParts) -> Controller:
            stream = PromptStream(train, cfg.data.train_batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
            return Controller(cfg, trainer=parts.trainer, rollout=rollout, rewards=rewards,
                              weight_sync=parts.weight_sync, stream=stream,
                              val_samples=val, tracker=tracker, checkpoints=checkpoints,
                              pad_id=tokenizer.pad_token_id, use_reference=use_reference, envs=envs,
                              critic=parts.critic, faults=faults)

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
        tracker.close()
        for group in reversed(groups):
            group.shutdown()
        stop_cluster(started)


def _install_sigterm_handler() -> threading.Event:
    """SIGTERM (Slurm preemption, Kubernetes eviction) sets a flag the controller polls
    between steps, instead of killing the run mid-update."""
    flag = threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            print("rlpost: SIGTERM received; finishing the current step, then checkpointing", flush=True)
            flag.set()

        signal.signal(signal.SIGTERM, on_term)
    return flag


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
        print(f"rlpost: {err}", file=sys.stderr)
        return Preempted.exit_code
    except RlpostError as err:
        print(f"rlpost: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
