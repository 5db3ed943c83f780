"""``trainer.mode=one_step_off|async`` (``rlpost.rollout.overlap``): the real controller with
the shipped fakes through the in-process groups of ``rlpost.local``, producer and
trainer on two threads. Policy-version bookkeeping, the staleness bound, resume with
buffered batches, and shutdown when either loop raises."""

from __future__ import annotations

import pickle
import threading
import time
import traceback
from pathlib import Path

import pytest
from test_controller import CrashingStream, RecordingRolloutGroup  # shared with the controller tests

from rlpost.checkpoint import CheckpointManager, read_state
from rlpost.config.convert import to_dict
from rlpost.config.load import load_config
from rlpost.step.controller import Controller
from rlpost.data.stream import PromptStream
from rlpost.engines.fake import FakeRolloutEngine, FakeTrainEngine
from rlpost.errors import ConfigError, Preempted
from rlpost.local import LocalRewardPool, LocalTrainerGroup, LocalWeightSync
from rlpost.rollout.overlap import BUFFER_FILE
from rlpost.tracking import Tracker
from rlpost.types import PromptSample

THIS_FILE = Path(__file__).resolve()
VOCAB, EOS, PAD, N = 16, 2, 0, 4


def letters(ids) -> str:
    return "".join(chr(ord("a") + t) for t in ids)


def share_reward(prompt, completion, ground_truth, metadata):
    """Loaded through reward.fn: the fraction of the completion's letters that are the answer."""
    return completion.count(ground_truth) / max(len(completion), 1)


SAMPLES = [PromptSample(uid=f"p{i}", prompt_ids=(1, 3 + i, 5 + i), question=f"q{i}", answer="abde"[i])
           for i in range(4)]


def make_cfg(out: Path, *overrides: str):
    return load_config([
        "logger=[jsonl]", f"output_dir={out}", "seed=3",
        "rollout.engine=fake", "rollout.replicas=2", f"rollout.n={N}", "rollout.max_new_tokens=8",
        "data.train_batch_size=2", "trainer.total_steps=4", "trainer.save_every=0", "trainer.lr=0.05",
        "trainer.mini_batches=2", "trainer.micro_batch_size=3", "eval.every=0", "eval.size=4",
        f"reward.fn='{THIS_FILE}:share_reward'", "reward.timeout_s=5", *overrides,
    ])


class SlowTrainer(LocalTrainerGroup):
    """A trainer slower than the fake sampler, so the producer runs ahead; ``fail_at``
    (1-based train_step call) raises like a crashed update."""

    delay_s, fail_at, calls = 0.0, None, 0

    def train_step(self, batch, loss_fn):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated trainer failure")
        time.sleep(self.delay_s)
        return super().train_step(batch, loss_fn)


def build(cfg, *, stream=None, delay_s: float = 0.0, fail_at=None) -> Controller:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = FakeTrainEngine(vocab_size=VOCAB, lr=cfg.trainer.lr, seed=cfg.seed)
    engines = [FakeRolloutEngine(vocab_size=VOCAB, eos_id=EOS, seed=cfg.seed + 1000 * i, decode=letters)
               for i in range(cfg.rollout.replicas)]
    trainer = SlowTrainer(policy, micro_batch_size=cfg.trainer.micro_batch_size)
    trainer.delay_s, trainer.fail_at = delay_s, fail_at
    controller = Controller(
        cfg, trainer=trainer, rollout=RecordingRolloutGroup(engines), rewards=LocalRewardPool(cfg.reward),
        weight_sync=LocalWeightSync(policy, engines),
        stream=stream or PromptStream(SAMPLES, cfg.data.train_batch_size, seed=cfg.seed),
        val_samples=SAMPLES, tracker=Tracker(cfg.logger, out, cfg.trainer.total_steps, to_dict(cfg)),
        checkpoints=CheckpointManager(out / "checkpoints", cfg.trainer.keep_last), pad_id=PAD, use_reference=False)
    # Independent record of what was trained: (trainer version, sampling versions, prompt uids).
    controller.trained = []
    train_on = controller.train_on

    def recording_train_on(step, collected, timer, t0):
        versions = {t.completion.policy_version for t in collected.trajectories}
        uids = [t.prompt.uid for t in collected.trajectories[::N]]
        controller.trained.append((controller.policy_version, versions, uids, collected.trajectories))
        return train_on(step, collected, timer, t0)

    controller.train_on = recording_train_on
    return controller


def metrics_rows(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "rlpost-rollout-producer"]


def stream_batches(cfg, count: int) -> list[list[str]]:
    stream = PromptStream(SAMPLES, cfg.data.train_batch_size, seed=cfg.seed)
    return [[s.uid for s in stream.next_batch()] for _ in range(count)]


# --------------------------------------------------------------------------- tests


def test_one_step_off_samples_batch_k_with_version_k_minus_2(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.mode=one_step_off")
    controller = build(cfg, delay_s=0.02)
    controller.run()
    # Batch 1 and 2 by version 0 (batch 2 while step 1 trains), then batch k by k - 2;
    # exactly 4 batches: none sampled past the last step.
    calls = controller.rollout.calls
    assert [{c.policy_version for g in groups for c in g} for groups in calls] == [{0}, {0}, {1}, {2}]
    assert [(version, versions) for version, versions, _, _ in controller.trained] == [
        (0, {0}), (1, {0}), (2, {1}), (3, {2})]
    rows = metrics_rows(tmp_path)
    assert [r["rollout/policy_version"] for r in rows] == [0, 0, 1, 2]
    assert [r["async/staleness_max"] for r in rows] == [0, 1, 1, 1]
    assert [r["async/staleness_mean"] for r in rows] == [0, 1, 1, 1]
    assert all(r["async/dropped_batches"] == 0 for r in rows)
    assert all(e.weight_updates == 4 and e.policy_version == 4 for e in controller.rollout.engines)
    # The batches are the stream's, in order; step 1 is exactly what sync mode trains.
    assert [uids for _, _, uids, _ in controller.trained] == stream_batches(cfg, 4)
    sync = build(make_cfg(tmp_path / "sync", "trainer.total_steps=1"))
    sync.run()
    assert metrics_rows(tmp_path / "sync")[0]["policy/loss"] == rows[0]["policy/loss"]
    assert not producer_threads()


def test_async_never_trains_on_samples_older_than_max_staleness(tmp_path):
    # Three batches may be sampled ahead but only one version of lag is allowed: with
    # a slow trainer the producer fills the buffer with version-0 batches, and the
    # third of them would be 2 versions old by the time the trainer reaches it.
    cfg = make_cfg(tmp_path, "trainer.mode=async", "trainer.max_staleness=1", "trainer.async_buffer=3",
                   "trainer.total_steps=6")
    controller = build(cfg, delay_s=0.1)
    controller.run()
    lags = [version - v for version, versions, _, _ in controller.trained for v in versions]
    assert len(controller.trained) == 6 and all(0 <= lag <= 1 for lag in lags)
    rows = metrics_rows(tmp_path)
    assert rows[-1]["async/dropped_batches"] >= 1  # the bound was enforced, not just never reached
    assert [r["async/staleness_max"] for r in rows] == [
        float(max(version - v for v in versions)) for version, versions, _, _ in controller.trained]
    # Dropped batches are sampled again from fresh prompts; the trained ones are the
    # stream's batches minus the dropped ones, in order.
    expected = stream_batches(cfg, 6 + int(rows[-1]["async/dropped_batches"]))
    trained = [uids for _, _, uids, _ in controller.trained]
    assert all(uids in expected for uids in trained) and trained[0] == expected[0]
    assert not producer_threads()


def test_async_checkpoint_holds_the_buffered_batches_and_resume_trains_them_first(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.mode=async", "trainer.max_staleness=2", "trainer.total_steps=5")
    first = build(cfg, delay_s=0.1)
    with pytest.raises(Preempted):
        first.run(0, stop_requested=lambda: len(first.trained) >= 2)
    path = CheckpointManager(tmp_path / "checkpoints", 2).latest()
    state = read_state(path)
    buffered = pickle.loads((path / BUFFER_FILE).read_bytes())
    # The slow trainer let the producer fill both slots while step 2 trained.
    assert state.step == 2 and state.overlap["buffered"] == len(buffered) == 2
    assert [b.index for b in buffered] == [3, 4] and state.overlap["produced"] == 4

    resumed = build(cfg, delay_s=0.1)
    resumed.restore(path, state)
    resumed.tracker.truncate_after(state.step)
    resumed.run(state.step)
    # The buffered batches are trained first, as sampled (same trajectories, same old versions).
    assert [t for _, _, _, t in resumed.trained[:2]] == [b.collected.trajectories for b in buffered]
    assert [v for _, v, _, _ in resumed.trained[:2]] == [{b.policy_version} for b in buffered]
    # No prompt batch is lost or repeated across the preemption (a buffer of
    # max_staleness slots drops nothing).
    trained = [uids for _, _, uids, _ in first.trained + resumed.trained]
    assert trained == stream_batches(cfg, 5)
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3, 4, 5]


def test_one_step_off_resume_repeats_the_uninterrupted_run(tmp_path):
    straight = build(make_cfg(tmp_path / "straight", "trainer.mode=one_step_off", "trainer.save_every=2"))
    straight.run()
    cfg = make_cfg(tmp_path / "crashed", "trainer.mode=one_step_off", "trainer.save_every=2")
    stream = CrashingStream(SAMPLES, cfg.data.train_batch_size, seed=cfg.seed, crash_on_batch=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(cfg, stream=stream).run()
    path = CheckpointManager(tmp_path / "crashed" / "checkpoints", 2).latest()
    state = read_state(path)
    # Saved after step 2: batch 3, sampled by version 1 while step 2 trained, waits in the buffer.
    assert state.step == 2 and state.overlap["buffered"] == 1
    assert [(b.index, b.policy_version) for b in pickle.loads((path / BUFFER_FILE).read_bytes())] == [(3, 1)]
    resumed = build(cfg)
    resumed.restore(path, state)
    resumed.tracker.truncate_after(state.step)
    resumed.run(state.step)
    keys = ["reward/mean", "policy/loss", "policy/grad_norm", "rollout/policy_version", "async/staleness_max"]
    expected, got = metrics_rows(tmp_path / "straight"), metrics_rows(tmp_path / "crashed")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in expected]
    assert len({r["policy/loss"] for r in expected}) == 4  # the compared numbers move


def test_producer_error_stops_the_run_and_is_raised_on_the_trainer_thread(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.mode=async", "trainer.max_staleness=1")
    stream = CrashingStream(SAMPLES, cfg.data.train_batch_size, seed=cfg.seed, crash_on_batch=3)
    with pytest.raises(RuntimeError, match="simulated crash") as err:
        build(cfg, stream=stream, delay_s=0.05).run()
    # The producer's own traceback and a note saying where it was raised.
    frames = [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    assert "_produce" in frames and "next_batch" in frames
    assert any("rollout producer thread" in note for note in err.value.__notes__)
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2]  # batches 1 and 2 were trained
    assert not producer_threads()


def test_trainer_error_stops_the_producer(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.mode=async", "trainer.max_staleness=2")
    controller = build(cfg, fail_at=3)  # mini_batches=2: the first update of step 2
    with pytest.raises(RuntimeError, match="simulated trainer failure"):
        controller.run()
    assert not producer_threads()
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1]
    # The producer stopped at its slot limit: at most 2 batches ahead of the 2 taken.
    assert len(controller.rollout.calls) <= 4


class WatchedRolloutEngine(FakeRolloutEngine):
    """Slow sampling that records weight updates arriving mid-request."""

    in_flight, mid_request_updates = 0, 0

    def generate(self, prompts, params):
        self.in_flight += 1
        time.sleep(0.05)
        try:
            return super().generate(prompts, params)
        finally:
            self.in_flight -= 1

    def update_weights(self, weights, version):
        self.mid_request_updates += self.in_flight > 0
        super().update_weights(weights, version)


def test_sampling_overlaps_training_but_weights_change_only_between_requests(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.mode=async", "trainer.max_staleness=2", "trainer.total_steps=6")
    controller = build(cfg)  # faster than the sampler: every push finds a batch being sampled
    engines = [WatchedRolloutEngine(vocab_size=VOCAB, eos_id=EOS, seed=i, decode=letters) for i in range(2)]
    controller.rollout.engines = controller.collector.rollout.engines = engines
    controller.weight_sync.link.rollout_engines = engines  # the link inside the replicas-lock wrapper
    sampling_during_updates = []
    train_step = controller.trainer.train_step

    def watched_train_step(batch, loss_fn):
        out = train_step(batch, loss_fn)
        sampling_during_updates.append(any(e.in_flight for e in engines))
        return out

    controller.trainer.train_step = watched_train_step
    controller.run()
    assert any(sampling_during_updates)  # the two loops really ran at once
    assert [e.mid_request_updates for e in engines] == [0, 0]
    assert all(e.weight_updates == 6 for e in engines)


def test_mode_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="trainer.mode"):
        make_cfg(tmp_path, "trainer.mode=overlap")
    with pytest.raises(ConfigError, match="trainer.max_staleness"):
        make_cfg(tmp_path, "trainer.mode=async", "trainer.max_staleness=0")
