"""Each off-policy correction trains: two real steps of ``trainer.mode=one_step_off`` on
the built-in tiny model (real controller, FSDP2 engine on one in-process gloo rank, HF
rollout engine, in-process groups of ``rlpost.local``). Step 2 trains on samples one
version old, so the behaviour ratios really differ from 1 and the correction acts."""

import json
import math
import random
from pathlib import Path

import pytest

from rlpost.checkpoint import CheckpointManager
from rlpost.config.load import load_config
from rlpost.config.schema import JsonlLogConfig, LoggerConfig
from rlpost.data.dataset import load_prompts
from rlpost.data.stream import PromptStream
from rlpost.engines.fsdp import FSDPEngine
from rlpost.engines.hf_rollout import HFRolloutEngine
from rlpost.local import LocalRewardPool, LocalRolloutGroup, LocalTrainerGroup, LocalWeightSync
from rlpost.models.loading import load_tokenizer, resolve_model_path
from rlpost.step.controller import Controller
from rlpost.tracking import Tracker
from rlpost.train import cache_root

pytestmark = pytest.mark.integration
THIS_FILE = Path(__file__).resolve()


def noise(prompt, completion, ground_truth, metadata):
    """A reward that varies within every group (the untrained tiny model's math answers
    are all wrong, and its samples of one prompt often identical), so the advantages and
    the updates are not zero: the test is that each correction trains, not what it learns."""
    return random.random()


@pytest.mark.parametrize("correction, share", [
    ("token_tis", "off_policy/capped_frac"), ("token_mask", "off_policy/masked_frac"),
    ("seq_tis", "off_policy/capped_frac"), ("seq_mask", "off_policy/masked_frac"),
])
def test_each_correction_trains_two_one_step_off_steps(correction, share, process_group, tmp_path):
    cfg = load_config(["+recipe=grpo_math", "trainer.total_steps=2", "data.train_batch_size=2", "rollout.n=4",
                       "rollout.max_new_tokens=16", "eval.every=0", "trainer.save_every=0", "trainer.lr=1e-3",
                       "trainer.mode=one_step_off", f"algorithm.off_policy.correction={correction}",
                       f"reward.fn='{THIS_FILE}:noise'",
                       f"output_dir={tmp_path}"])
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path)
    train, _ = load_prompts(cfg.data, tokenizer, "train", seed=cfg.seed, data_dir=cache_root() / "data")
    policy = FSDPEngine(model_path, cfg.model, cfg.trainer, seed=cfg.seed, logit_temperature=cfg.rollout.temperature)
    rollout = HFRolloutEngine(model_path, seed=cfg.seed)
    controller = Controller(
        cfg, trainer=LocalTrainerGroup(policy, micro_batch_size=cfg.trainer.micro_batch_size),
        rollout=LocalRolloutGroup([rollout]), rewards=LocalRewardPool(cfg.reward),
        weight_sync=LocalWeightSync(policy, [rollout]),
        stream=PromptStream(train, cfg.data.train_batch_size, seed=cfg.seed), val_samples=[],
        tracker=Tracker(LoggerConfig(jsonl=JsonlLogConfig()), tmp_path, 2, {}),
        checkpoints=CheckpointManager(tmp_path / "checkpoints", 1), pad_id=tokenizer.pad_token_id,
        use_reference=False)
    controller.run(0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rollout.policy_version == 2
    assert [r["async/staleness_max"] for r in rows] == [0, 1]
    for r in rows:
        assert r["policy/updates"] == 1 and r["policy/skipped"] == 0 and math.isfinite(r["policy/loss"])
        assert 0 < r["off_policy/ratio_min"] <= r["off_policy/ratio_mean"] <= r["off_policy/ratio_max"]
        # One mini-batch: the trainer's pre-update log-probs are the training forward's.
        assert 0 <= r[share] <= 1 and r["perf/old_logprob_pass"] == 0.0
    # Step 2's samples come from version 0 and its pi_old is version 1: the ratios spread.
    assert rows[1]["off_policy/ratio_max"] - rows[1]["off_policy/ratio_min"] > 1e-4
