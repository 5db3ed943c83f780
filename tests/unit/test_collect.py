"""DAPO's data-side stages in the collector: dynamic sampling (drop groups whose
rewards are all equal, draw more prompts, fill up when the round limit is hit),
and the soft overlong penalty (overlong filtering acts on the train batch:
test_controller.py). Fakes only: no model, no Ray."""

from __future__ import annotations

from pathlib import Path

import torch

from rlpost.rollout.collect import CollectSettings, Collector
from rlpost.config.load import load_config
from rlpost.data.stream import PromptStream
from rlpost.engines.fake import FakeRolloutEngine
from rlpost.local import LocalRewardPool, LocalRolloutGroup
from rlpost.types import PromptSample

THIS_FILE = Path(__file__).resolve()


def split_reward(prompt, completion, ground_truth, metadata):
    """Prompts marked "flat" score 1 for every completion (an uninformative group);
    the others score by the completion's parity (mixed within a group)."""
    if metadata["flat"]:
        return 1.0
    return float(len(completion) % 2)


def make(tmp_path, *overrides, flat=(0, 1, 2, 3), message=print):
    cfg = load_config(["logger=[jsonl]", f"output_dir={tmp_path}", "rollout.engine=fake", "rollout.n=4",
                       "data.train_batch_size=2", f"reward.fn={THIS_FILE}:split_reward", *overrides])
    samples = [PromptSample(uid=f"p{i}", prompt_ids=(1, 3 + i), question=f"q{i}", answer="1",
                            metadata={"flat": i in flat}) for i in range(8)]
    stream = PromptStream(samples, cfg.data.train_batch_size, seed=0, shuffle=False)
    rollout = LocalRolloutGroup([FakeRolloutEngine(vocab_size=16, eos_id=2, seed=0)])
    return cfg, Collector(CollectSettings.of(cfg), stream, rollout, LocalRewardPool(cfg.reward), message=message)


def timer(name):
    import contextlib

    return contextlib.nullcontext()


def test_dynamic_sampling_skips_flat_groups(tmp_path):
    # Prompts 0-3 are flat, 4-7 mixed; batches of 2 in order: rounds 1-2 draw only flat
    # groups, round 3 draws prompts 4 and 5.
    cfg, collector = make(tmp_path, "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=3")
    out = collector.collect(step=1, policy_version=0, timer=timer)
    assert out.metrics["sampling/groups_drawn"] == 6.0
    assert out.rewards.shape == (2, 4)
    informative = int(out.metrics["sampling/groups_informative"])
    assert informative >= 1 and informative + out.metrics["sampling/groups_filled"] == 2
    # informative groups come first, and only the mixed prompts of round 3 can be one
    kept = out.rewards[:informative]
    assert (kept.max(dim=1).values > kept.min(dim=1).values).all()
    assert {t.prompt.uid for t in out.trajectories[: 4 * informative]} <= {"p4", "p5"}


def test_round_limit_fills_with_dropped_groups(tmp_path):
    cfg, collector = make(tmp_path, "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=1")
    out = collector.collect(step=1, policy_version=0, timer=timer)
    assert out.metrics == {"sampling/groups_drawn": 2.0, "sampling/groups_informative": 0.0,
                           "sampling/groups_filled": 2.0}
    assert torch.equal(out.rewards, torch.ones(2, 4))


def test_padding_a_short_batch_is_said_once(tmp_path):
    said = []
    # Every prompt flat: every step pads the whole batch.
    cfg, collector = make(tmp_path, "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=1",
                          flat=range(8), message=said.append)
    collector.collect(step=1, policy_version=0, timer=timer)
    assert len(said) == 1
    assert "step 1" in said[0] and "padded with 2" in said[0] and "algorithm.max_sampling_rounds" in said[0]
    out = collector.collect(step=2, policy_version=0, timer=timer)
    assert len(said) == 1 and out.metrics["sampling/groups_filled"] == 2.0


def test_a_full_batch_says_nothing(tmp_path):
    said = []
    cfg, collector = make(tmp_path, "algorithm.dynamic_sampling=true", flat=(), message=said.append)
    out = collector.collect(step=1, policy_version=0, timer=timer)
    assert out.metrics["sampling/groups_filled"] == 0.0 and said == []


def test_without_dynamic_sampling_every_group_is_kept(tmp_path):
    cfg, collector = make(tmp_path)
    out = collector.collect(step=1, policy_version=0, timer=timer)
    assert out.metrics == {} and [t.prompt.uid for t in out.trajectories][::4] == ["p0", "p1"]


def test_overlong_penalty_shapes_rewards_but_not_the_task_reward(tmp_path):
    cfg, collector = make(tmp_path, "rollout.max_new_tokens=8", "algorithm.overlong_buffer_len=4")
    out = collector.collect(step=1, policy_version=0, timer=timer)
    for row, traj in zip(out.rewards.flatten().tolist(), out.trajectories):
        length = len(traj.completion.token_ids)
        # penalty: 0 up to 8 - 4 = 4 tokens, then -(L - 4) / 4 (DAPO eq. 13)
        expected = traj.reward.total - min(max(length - 4, 0) / 4, 1.0)
        assert abs(row - expected) < 1e-6, (length, row, expected)


def test_remax_scores_one_greedy_rollout_per_prompt_as_the_baseline(tmp_path):
    cfg, collector = make(tmp_path, "algorithm.adv_estimator=remax", flat=(0,))
    out = collector.collect(step=1, policy_version=0, timer=timer)
    baseline = out.estimator_args["baseline"]
    # prompt 0 is flat (every completion scores 1); prompt 1 scores a completion by parity
    assert baseline.shape == (2,) and baseline[0].item() == 1.0 and baseline[1].item() in (0.0, 1.0)
    assert out.estimator_args["baseline_valid"].all()
