"""Engines behind the interfaces in ``rlpost.engines.base``, chosen by config name."""

from __future__ import annotations

from rlpost.config.schema import RunConfig


def make_rollout_engine(cfg: RunConfig, model_path: str, seed: int):
    """The rollout engine named by ``cfg.rollout.engine``."""
    if cfg.rollout.engine == "hf":
        from rlpost.engines.hf_rollout import HFRolloutEngine

        return HFRolloutEngine(model_path, dtype=cfg.model.dtype, seed=seed, batch_size=cfg.rollout.batch_size)
    if cfg.rollout.engine == "fake":
        from rlpost.engines.fake import FakeRolloutEngine

        return FakeRolloutEngine(seed=seed)
    raise ValueError(f"unknown rollout engine {cfg.rollout.engine!r}")
