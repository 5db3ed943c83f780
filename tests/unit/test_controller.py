"""The real GRPO ``Controller`` driven for a few steps by the shipped fakes through the
in-process groups of ``rlpost.local``: metrics, on-policy sampling, weight-sync
failures, reward failures, and checkpoint/resume equivalence. No Ray, no model.

Token ids are letters: id ``t`` decodes to ``chr(ord("a") + t)``; id 2 ("c") is EOS
and never appears in text.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlpost.checkpoint import CheckpointManager, ControllerState, read_state
from rlpost.config.convert import to_dict
from rlpost.config.load import load_config
from rlpost.config.schema import RunConfig
from rlpost.step.controller import Controller
from rlpost.data.stream import PromptStream
from rlpost.engines.fake import FakeRolloutEngine, FakeTrainEngine
from rlpost.errors import TrainingError, WorkerError
from rlpost.local import LocalRewardPool, LocalRolloutGroup, LocalTrainerGroup, LocalWeightSync
from rlpost.tracking import Tracker
from rlpost.types import PromptSample, SamplingParams

THIS_FILE = Path(__file__).resolve()
VOCAB, EOS, PAD = 16, 2, 0
N = 4  # completions per prompt (the GRPO group size)


def letters(ids) -> str:
    return "".join(chr(ord("a") + t) for t in ids)


# Reward functions; the controller loads them from this file through reward.fn.
def letter_reward(prompt, completion, ground_truth, metadata):
    """accuracy: the completion starts with the answer letter; share: the fraction
    of its letters that are the answer letter."""
    return {"accuracy": float(completion.startswith(ground_truth)),
            "share": completion.count(ground_truth) / max(len(completion), 1)}


def poisoned_reward(prompt, completion, ground_truth, metadata):
    """1 for every sample of a healthy prompt; raises on prompts marked poison."""
    if metadata["poison"]:
        raise ValueError("cannot score this prompt")
    return 1.0


def noisy_letter_reward(prompt, completion, ground_truth, metadata):
    """``letter_reward`` plus noise from Python's global generator, which a resume
    must continue, not restart (the controller checkpoints its generators)."""
    scores = letter_reward(prompt, completion, ground_truth, metadata)
    return {**scores, "share": scores["share"] + random.random() / 100}


def make_samples(poisoned: tuple[int, ...] = ()) -> list[PromptSample]:
    return [PromptSample(uid=f"p{i}", prompt_ids=(1, 3 + i, 5 + i), question=f"q{i}", answer="abde"[i],
                         metadata={"poison": i in poisoned}) for i in range(4)]


def make_cfg(out: Path, *overrides: str, reward_fn: str = "letter_reward") -> RunConfig:
    return load_config([
        "logger=[jsonl]", f"output_dir={out}", "seed=3",
        "rollout.engine=fake", "rollout.replicas=2", f"rollout.n={N}", "rollout.max_new_tokens=8",
        "data.train_batch_size=4",  # the whole (4-prompt) set each step
        "trainer.total_steps=4", "trainer.save_every=2", "trainer.lr=0.05",
        "trainer.mini_batches=2", "trainer.micro_batch_size=3",  # 16 rows: uneven micro-batches
        "eval.every=2", "eval.size=4",
        f"reward.fn='{THIS_FILE}:{reward_fn}'", "reward.timeout_s=5",
        *overrides,
    ])


class RecordingRolloutGroup(LocalRolloutGroup):
    """Keeps every batch of completions it hands out."""

    def __init__(self, engines):
        super().__init__(engines)
        self.calls: list[list] = []

    def generate(self, prompts, params):
        groups = super().generate(prompts, params)
        self.calls.append(groups)
        return groups


class StuckRolloutEngine(FakeRolloutEngine):
    """Takes the weights but keeps serving its old version, like a replica whose
    update silently failed."""

    def update_weights(self, weights, version):
        super().update_weights(weights, self.policy_version)


class CrashingStream(PromptStream):
    """Fails when asked for batch ``crash_on_batch`` (1-based): the run dies at the
    start of that step, after the previous steps were logged."""

    def __init__(self, *args, crash_on_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_on_batch, self.batches = crash_on_batch, 0

    def next_batch(self):
        self.batches += 1
        if self.batches == self.crash_on_batch:
            raise RuntimeError("simulated crash")
        return super().next_batch()


def build(cfg: RunConfig, samples: list[PromptSample], *, stream: PromptStream | None = None,
          synced_replicas: int | None = None, with_reference: bool = False,
          length_fraction: float = 0.25) -> Controller:
    """A controller over fakes, wired like rlpost.train wires the Ray groups."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = FakeTrainEngine(vocab_size=VOCAB, lr=cfg.trainer.lr, seed=cfg.seed, grad_clip=cfg.trainer.grad_clip)
    reference = FakeTrainEngine(vocab_size=VOCAB, seed=cfg.seed) if with_reference else None
    engines = [FakeRolloutEngine(vocab_size=VOCAB, eos_id=EOS, seed=cfg.seed + 1000 * i, decode=letters,
                                 length_fraction=length_fraction) for i in range(cfg.rollout.replicas)]
    return Controller(
        cfg,
        trainer=LocalTrainerGroup(policy, reference, micro_batch_size=cfg.trainer.micro_batch_size),
        rollout=RecordingRolloutGroup(engines),
        rewards=LocalRewardPool(cfg.reward),
        weight_sync=LocalWeightSync(policy, engines[:synced_replicas]),
        stream=stream or PromptStream(samples, cfg.data.train_batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle),
        val_samples=samples,
        tracker=Tracker(cfg.logger, out, cfg.trainer.total_steps, to_dict(cfg)),
        checkpoints=CheckpointManager(out / "checkpoints", cfg.trainer.keep_last),
        pad_id=PAD,
        use_reference=with_reference,
    )


def nan_loss_fn(cfg: RunConfig):
    """The recipe's policy loss times NaN: every update it drives is non-finite."""
    from rlpost.algorithms import make_policy_loss_fn

    good = make_policy_loss_fn(cfg.algorithm)

    def poisoned(out, mb):
        loss, metrics = good(out, mb)
        return loss * float("nan"), metrics

    return poisoned


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- tests


def test_steps_report_metrics_and_sample_on_policy(tmp_path):
    cfg = make_cfg(tmp_path, "eval.every=0", "trainer.mini_batches=1", "algorithm.kl_coef=0.1")
    controller = build(cfg, make_samples(), with_reference=True)
    history = [controller.step(step) for step in (1, 2, 3)]

    for step, metrics in enumerate(history, start=1):
        assert {"reward/mean", "reward/std", "reward/errors",
                "reward/accuracy_mean", "reward/share_mean"} <= metrics.keys()
        assert {"timing/rollout_s", "timing/reward_s", "timing/old_logprobs_s", "timing/ref_logprobs_s",
                "timing/train_s", "timing/weight_sync_s", "timing/step_s"} <= metrics.keys()
        assert {"policy/loss", "policy/pg_loss", "policy/entropy", "policy/kl", "policy/grad_norm",
                "policy/lr", "policy/updates"} <= metrics.keys()
        assert metrics["policy/updates"] == 1.0 and metrics["policy/lr"] == 0.05
        assert metrics["reward/errors"] == 0.0
        assert metrics["rollout/policy_version"] == step - 1
    # Rollouts of step s were sampled by version s - 1: exactly on-policy.
    calls = controller.rollout.calls
    assert [{c.policy_version for group in groups for c in group} for groups in calls] == [{0}, {1}, {2}]
    assert all(len(groups) == 4 and all(len(g) == N for g in groups) for groups in calls)
    assert controller.rollout.policy_versions() == [3, 3] and controller.policy_version == 3
    assert all(e.weight_updates == 3 and e.last_weight_names == ["table.weight"] for e in controller.rollout.engines)
    # Policy and reference start identical, so the first (on-policy) update sees
    # k3 KL = exp(0) - 0 - 1 = 0; after two updates the policy has moved away.
    assert history[0]["policy/kl"] == pytest.approx(0.0, abs=1e-7)
    assert history[2]["policy/kl"] > 1e-6


def test_reinforce_pp_with_kl_in_reward_trains_per_token_returns(tmp_path):
    cfg = make_cfg(tmp_path, "eval.every=0", "trainer.mini_batches=1", "algorithm.adv_estimator=reinforce_pp",
                   "algorithm.kl_in_reward=true", "algorithm.kl_coef=0.5")
    controller = build(cfg, make_samples(), with_reference=True)
    seen = []
    train_step = controller.trainer.train_step
    controller.trainer.train_step = lambda mini, loss_fn: (seen.append(mini), train_step(mini, loss_fn))[1]
    controller.step(1)
    controller.step(2)
    first, second = seen
    # Step 1: policy = reference, no KL: every token of a row has its sample's advantage.
    for batch in (first, second):
        assert batch.advantages.shape == batch.loss_mask.shape
        assert torch.all(batch.advantages[batch.loss_mask == 0] == 0)
    rows = [first.advantages[i][first.loss_mask[i] > 0] for i in range(first.size)]
    assert all(torch.allclose(r, r[0].expand_as(r)) for r in rows if r.numel())
    # Step 2: the policy has moved, and a token is charged the KL from itself to the end,
    # so advantages change along a row (one summed-KL advantage per sample would not).
    rows = [second.advantages[i][second.loss_mask[i] > 0] for i in range(second.size)]
    assert any(not torch.allclose(r, r[0].expand_as(r)) for r in rows if r.numel() > 1)
    assert second.advantages[second.loss_mask > 0].mean().abs() < 1e-5  # whitened over tokens


def test_replica_that_misses_a_weight_sync_fails_the_next_step(tmp_path):
    # The sync reaches replica 0 only; replica 1 keeps serving version 0.
    controller = build(make_cfg(tmp_path, "eval.every=0"), make_samples(), synced_replicas=1)
    controller.step(1)
    with pytest.raises(WorkerError, match=r"policy versions \[0\], expected 1.*missed a weight sync"):
        controller.step(2)


def test_weight_sync_raises_when_a_replica_keeps_its_old_version():
    engines = [FakeRolloutEngine(vocab_size=VOCAB, eos_id=EOS), StuckRolloutEngine(vocab_size=VOCAB, eos_id=EOS)]
    sync = LocalWeightSync(FakeTrainEngine(vocab_size=VOCAB), engines)
    with pytest.raises(WorkerError, match=r"version 1: replicas \[1\] serve versions \[0\]"):
        sync.push(1)
    assert engines[0].policy_version == 1 and engines[1].last_weight_names == ["table.weight"]


def test_failed_reward_samples_are_excluded_and_the_step_completes(tmp_path):
    cfg = make_cfg(tmp_path, "eval.every=0", reward_fn="poisoned_reward")
    metrics = build(cfg, make_samples(poisoned=(1,))).step(1)
    # Every batch holds all 4 prompts, one poisoned: its N samples fail. Had they
    # been scored 0, the mean of the 16 rewards would be 12/16, not 1.
    assert metrics["reward/errors"] == float(N)
    assert metrics["reward/mean"] == 1.0 and metrics["reward/std"] == 0.0
    assert metrics["policy/updates"] == 2.0


def test_step_fails_loudly_when_every_reward_fails(tmp_path):
    cfg = make_cfg(tmp_path, "eval.every=0", reward_fn="poisoned_reward")
    with pytest.raises(TrainingError, match="no trainable tokens"):
        build(cfg, make_samples(poisoned=(0, 1, 2, 3))).step(1)


def test_every_completion_hitting_the_length_cap_warns_once(tmp_path, capsys):
    cfg = make_cfg(tmp_path / "capped", "eval.every=0", "trainer.save_every=0", "trainer.total_steps=3")
    build(cfg, make_samples(), length_fraction=1.0).run()
    warned = capsys.readouterr().out.count("every completion hit rollout.max_new_tokens=8")
    assert warned == 1  # not silent, and not once per step
    assert all(r["response/clip_ratio"] == 1.0 for r in read_jsonl(tmp_path / "capped" / "metrics.jsonl"))

    build(make_cfg(tmp_path / "some", "eval.every=0", "trainer.save_every=0"), make_samples()).run()
    assert "every completion hit" not in capsys.readouterr().out  # a quarter capped: no warning


def test_overlong_filter_trains_only_completions_that_stopped(tmp_path):
    cfg = make_cfg(tmp_path, "eval.every=0", "trainer.save_every=0", "trainer.mini_batches=1",
                   "algorithm.overlong_filter=true")
    controller = build(cfg, make_samples())
    trained = []
    train_step = controller.trainer.train_step
    controller.trainer.train_step = lambda batch, loss_fn, **kw: trained.append(batch) or train_step(batch, loss_fn, **kw)
    controller.step(1)
    completions = [c for group in controller.rollout.calls[-1] for c in group]
    reasons = {c.finish_reason for c in completions}
    assert reasons == {"stop", "length"}  # both kinds present, so the filter has work to do
    stopped_tokens = sum(len(c.token_ids) for c in completions if c.finish_reason == "stop")
    assert trained[0].global_num_tokens == stopped_tokens

    # Every completion truncated: nothing left to train on, and the step says so.
    with pytest.raises(TrainingError, match="no trainable tokens"):
        build(make_cfg(tmp_path / "all", "algorithm.overlong_filter=true"), make_samples(), length_fraction=1.0).step(1)


def test_resume_from_checkpoint_repeats_the_uninterrupted_run(tmp_path):
    samples = make_samples()
    straight_cfg = make_cfg(tmp_path / "straight", reward_fn="noisy_letter_reward")
    random.seed(0)  # each run starts as a fresh process would
    build(straight_cfg, samples).run()
    expected = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in expected] == [0, 1, 2, 3, 4]  # step 0: the initial eval

    # Same config; the run dies at the start of step 4, after the step-2 checkpoint
    # and after step 3 was logged.
    cfg = make_cfg(tmp_path / "crashed", reward_fn="noisy_letter_reward")
    stream = CrashingStream(samples, cfg.data.train_batch_size, seed=cfg.seed, crash_on_batch=4)
    random.seed(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(cfg, samples, stream=stream).run()
    assert [r["step"] for r in read_jsonl(tmp_path / "crashed" / "metrics.jsonl")] == [0, 1, 2, 3]

    # A fresh controller (fresh engines, and a process whose generators are elsewhere)
    # resumes as rlpost.train does.
    random.seed(12345)
    resumed = build(cfg, samples)
    path = resumed.checkpoints.latest()
    state = read_state(path)
    assert path.name == "step_000002" and (state.step, state.policy_version) == (2, 2)
    resumed.restore(path, state)
    resumed.tracker.truncate_after(state.step)
    resumed.run(state.step)

    got = read_jsonl(tmp_path / "crashed" / "metrics.jsonl")
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]  # step 3 once, not twice
    keys = ["reward/mean", "reward/std", "reward/share_mean", "policy/loss", "policy/entropy",
            "policy/grad_norm", "policy/approx_kl_old", "rollout/logprob_abs_diff_mean",
            "eval/accuracy", "eval/reward_mean"]
    assert [{k: r.get(k) for k in keys} for r in got] == [{k: r.get(k) for k in keys} for r in expected]
    # The compared numbers move from step to step (weights and samples change), so
    # a resume that lost the weights or the data position would not match.
    assert len({r["policy/entropy"] for r in expected[1:]}) == 4
    assert len({r["reward/share_mean"] for r in expected[1:]}) > 1


def test_rollout_group_splits_contiguously_with_per_replica_seeds():
    params = SamplingParams(n=2, max_new_tokens=6, seed=11)
    group = LocalRolloutGroup([FakeRolloutEngine(vocab_size=VOCAB, eos_id=EOS) for _ in range(2)])
    prompts = [[1, 4], [1, 4], [1, 4]]
    out = group.generate(prompts, params)
    # ceil(3 / 2) = 2 prompts for replica 0 at seed 11 * 1009 + 0, 1 for replica 1 at 11 * 1009 + 1.
    solo = FakeRolloutEngine(vocab_size=VOCAB, eos_id=EOS)
    assert out == (solo.generate(prompts[:2], replace(params, seed=11099))
                   + solo.generate(prompts[2:], replace(params, seed=11100)))
    assert out[0] == out[1] and out[1] != out[2]  # same replica and seed; other replica, other seed
    assert group.generate([], params) == []


def test_stop_request_finishes_the_step_checkpoints_and_raises(tmp_path):
    # What a SIGTERM does: the flag is seen after step 1 (not a save_every step), the
    # step is checkpointed and Preempted says so; resuming continues at step 2.
    from rlpost.errors import Preempted

    cfg = make_cfg(tmp_path / "run")
    controller = build(cfg, make_samples())
    with pytest.raises(Preempted) as err:
        controller.run(0, stop_requested=lambda: True)
    assert err.value.step == 1 and Preempted.exit_code == 75
    latest = CheckpointManager(tmp_path / "run" / "checkpoints", 2).latest()
    assert latest is not None and read_state(latest).step == 1
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 1]


def test_nan_updates_are_skipped_then_stop_the_run(tmp_path):
    # Poison the loss: every update is non-finite. The first max_bad_steps are skipped
    # (weights unchanged, reported); one more stops the run with a clear error.
    cfg = make_cfg(tmp_path / "run", "trainer.max_bad_steps=2", "trainer.mini_batches=1")
    controller = build(cfg, make_samples())
    controller.loss_fn = nan_loss_fn(cfg)
    before = controller.trainer.engine.model.table.weight.detach().clone()
    metrics = controller.step(1)
    assert metrics["policy/skipped"] == 1.0
    assert torch.equal(controller.trainer.engine.model.table.weight, before)
    controller.step(2)
    with pytest.raises(TrainingError, match="max_bad_steps=2"):
        controller.step(3)


def test_resume_keeps_the_count_of_bad_updates_in_a_row(tmp_path):
    # Two skipped updates, a checkpoint, a crash: the resumed run must stop at the
    # third, not grant max_bad_steps more (a diverged run would loop forever).
    cfg = make_cfg(tmp_path / "run", "trainer.max_bad_steps=2", "trainer.mini_batches=1")
    poisoned = nan_loss_fn(cfg)
    controller = build(cfg, make_samples())
    controller.loss_fn = poisoned
    controller.step(1)
    controller.step(2)
    controller.save(2)

    resumed = build(cfg, make_samples())
    resumed.loss_fn = poisoned
    path = resumed.checkpoints.latest()
    resumed.restore(path, read_state(path))
    assert resumed.bad_updates == 2
    with pytest.raises(TrainingError, match="3 updates in a row"):
        resumed.step(3)


def test_checkpoint_files_are_on_disk_before_latest_names_them(tmp_path, monkeypatch):
    # A power cut may persist a rename before the data it names unless every file is
    # fsynced first: record the order of fsyncs and renames.
    import rlpost.checkpoint as ckpt

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                      real_fsync(fd)))
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    manager = CheckpointManager(tmp_path, keep_last=2)
    tmp = manager.begin(3)
    (tmp / "policy").mkdir()
    (tmp / "policy" / "model.pt").write_bytes(b"weights")
    final = manager.commit(tmp, ControllerState(step=3, policy_version=3, data={}, kl_controller={}))

    publish = events.index(("replace", str(tmp_path / "latest")))
    synced = {path for kind, path in events[:publish] if kind == "fsync"}
    assert {str(tmp / "policy" / "model.pt"), str(tmp / "controller.json"), str(tmp / "policy"), str(tmp),
            str(tmp_path / "latest.tmp")} <= synced
    assert events[publish + 1:] == [("fsync", str(tmp_path))]
    assert manager.latest() == final and (final / "policy" / "model.pt").read_bytes() == b"weights"
