"""``trainer.inflight_updates`` (``rlpost.rollout.overlap``, ``rlpost.rollout.provenance``):
weight pushes that do not wait for the batch in flight, per-token provenance metrics
worked out by hand, the staleness bound on a batch's oldest token, the version check
of collected samples, and a checkpoint taken with a batch in flight."""

from __future__ import annotations

import pickle
import time

import pytest
from test_overlap import SAMPLES, build, make_cfg, metrics_rows, producer_threads, stream_batches

from rlpost.checkpoint import CheckpointManager, read_state
from rlpost.engines.fake import FakeRolloutEngine
from rlpost.errors import ConfigError, Preempted, WorkerError
from rlpost.rollout.collect import Collected, Collector
from rlpost.rollout.overlap import BUFFER_FILE, OverlappedRun, RolloutBuffer, SampledBatch
from rlpost.rollout.provenance import token_lag_metrics
from rlpost.types import Completion, Reward, Trajectory


def trajectory(versions: tuple[int, ...], mask: tuple[int, ...] | None = None) -> Trajectory:
    c = Completion(token_ids=tuple(range(3, 3 + len(versions))), logprobs=(0.0,) * len(versions), text="",
                   finish_reason="length", policy_version=min(versions), loss_mask=mask,
                   token_versions=versions if len(set(versions)) > 1 else None)
    return Trajectory(prompt=SAMPLES[0], completion=c, reward=Reward(0.0), group_index=0)


def test_token_lag_shares_count_sampled_tokens_only():
    # Update from version 3. Sample 1: lags 2, 1, 0 (the version-1 token is 2 behind);
    # sample 2: its first and third tokens were sampled (lags 3 and 0), the middle one
    # is an environment's (mask 0) and not counted. 5 sampled tokens in all.
    trajectories = [trajectory((1, 2, 3)), trajectory((0, 0, 3), mask=(1, 0, 1))]
    assert token_lag_metrics(trajectories, 3) == {
        "async/version_oldest": 0.0, "async/version_newest": 3.0,
        "async/token_lag_0": 2 / 5, "async/token_lag_1": 1 / 5, "async/token_lag_2plus": 2 / 5}
    # Uniform versions (token_versions None) count like a list of that version.
    assert token_lag_metrics([trajectory((2, 2))], 3)["async/token_lag_1"] == 1.0


class Owner:
    """The two calls the trainer loop makes of its owner (``StepOwner``), recorded."""

    def __init__(self, policy_version: int):
        self.policy_version, self.trained, self.metrics = policy_version, [], []

    def train_on(self, step, collected, timer, t0):
        self.trained.append(collected)
        return {"timing/weight_sync_s": 0.0}

    def finish_step(self, step, metrics, stop_requested, replicas_lock=None):
        self.metrics.append(metrics)


def test_staleness_bound_applies_to_the_oldest_token_of_a_batch(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.mode=async", "trainer.inflight_updates=true", "trainer.max_staleness=1",
                   "trainer.total_steps=1")
    owner = Owner(policy_version=3)
    run = OverlappedRun(cfg.trainer, owner, collector=None)
    # Mostly fresh, but one token of version 1 is 2 versions behind 3: dropped. The
    # second batch's oldest token (version 2) is 1 behind: trained.
    stale = [trajectory((1, 3, 3)), trajectory((3, 3))]
    fresh = [trajectory((2, 3)), trajectory((3, 3))]
    batches = [SampledBatch(i + 1, min(t.completion.policy_version for t in ts), Collected(ts, None, None, {}), {})
               for i, ts in enumerate([stale, fresh])]
    run._train(RolloutBuffer(capacity=2, budget=0, sampled=2, restored=batches), 0, lambda: False)
    assert [c.trajectories for c in owner.trained] == [fresh]
    [metrics] = owner.metrics
    assert metrics["async/dropped_batches"] == 1.0
    assert metrics["async/staleness_max"] == 1.0 and metrics["async/staleness_mean"] == 0.5
    assert metrics["async/token_lag_1"] == 1 / 4 and metrics["async/token_lag_0"] == 3 / 4


def test_collected_versions_may_be_later_in_flight_never_older():
    completion = trajectory((2, 3)).completion
    Collector._check_versions([[completion]], 2, inflight=True)
    with pytest.raises(WorkerError, match="policy versions \\[2\\], expected 3"):
        Collector._check_versions([[completion]], 3, inflight=True)
    with pytest.raises(WorkerError, match="expected 1"):  # not in flight: exactly the version served
        Collector._check_versions([[completion]], 1, inflight=False)


class InflightFakeEngine(FakeRolloutEngine):
    """A fake engine whose requests take a while and take new weights mid-request:
    a sample's first half is labelled with the version it started with, the rest with
    the version it ended with (what the real engines do per decoding step)."""

    mid_request_updates = 0

    def generate(self, prompts, params):
        start = self.policy_version
        time.sleep(0.05)
        groups = super().generate(prompts, params)
        end = self.policy_version
        if end == start:
            return groups
        self.mid_request_updates += 1
        return [[self._split(c, start, end) for c in g] for g in groups]

    @staticmethod
    def _split(c: Completion, start: int, end: int) -> Completion:
        half = len(c.token_ids) // 2
        versions = (start,) * half + (end,) * (len(c.token_ids) - half)
        return Completion(c.token_ids, c.logprobs, c.text, c.finish_reason, min(versions), c.loss_mask,
                          versions if len(set(versions)) > 1 else None)


def inflight_controller(cfg):
    from test_overlap import letters

    controller = build(cfg)  # a trainer faster than the sampler: pushes land mid-request
    engines = [InflightFakeEngine(vocab_size=16, eos_id=2, seed=i, decode=letters)
               for i in range(cfg.rollout.replicas)]
    controller.rollout.engines = controller.collector.rollout.engines = engines
    controller.weight_sync.link.rollout_engines = engines  # the link inside the push wrapper
    return controller, engines


def test_inflight_pushes_reach_requests_being_sampled(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.mode=async", "trainer.inflight_updates=true", "trainer.max_staleness=2",
                   "trainer.total_steps=6")
    controller, engines = inflight_controller(cfg)
    controller.run()
    assert sum(e.mid_request_updates for e in engines) >= 1  # the push did not wait for the request
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["async/token_lag_0"] + r["async/token_lag_1"] + r["async/token_lag_2plus"] == pytest.approx(1.0)
        assert r["async/version_oldest"] <= r["async/version_newest"]
        assert r["async/staleness_max"] <= 2
    assert any(r["async/version_oldest"] < r["async/version_newest"] for r in rows)  # a batch of two versions
    assert not producer_threads()


def test_checkpoint_in_flight_holds_the_finished_batch_and_resume_trains_it(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.mode=async", "trainer.inflight_updates=true", "trainer.max_staleness=2",
                   "trainer.total_steps=5")
    first, _ = inflight_controller(cfg)
    with pytest.raises(Preempted):
        first.run(0, stop_requested=lambda: len(first.trained) >= 2)
    path = CheckpointManager(tmp_path / "checkpoints", 2).latest()
    state = read_state(path)
    buffered = pickle.loads((path / BUFFER_FILE).read_bytes())
    # The save waited for the batch in flight: every batch produced is trained or in the file.
    assert state.step == 2 and state.overlap["produced"] == 2 + len(buffered)
    assert [b.index for b in buffered] == list(range(3, 3 + len(buffered)))
    for b in buffered:  # a batch is as old as its oldest token
        assert b.policy_version == min(t.completion.policy_version for t in b.collected.trajectories)

    resumed, _ = inflight_controller(cfg)
    resumed.restore(path, state)
    resumed.tracker.truncate_after(state.step)
    resumed.run(state.step)
    assert [t for _, _, _, t in resumed.trained[:len(buffered)]] == [b.collected.trajectories for b in buffered]
    trained = [uids for _, _, uids, _ in first.trained + resumed.trained]
    assert trained == stream_batches(cfg, 5)  # nothing lost or repeated
    assert [r["step"] for r in metrics_rows(tmp_path)] == [1, 2, 3, 4, 5]


def test_inflight_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="trainer.inflight_updates: needs trainer.mode=async"):
        make_cfg(tmp_path, "trainer.mode=one_step_off", "trainer.inflight_updates=true")
    with pytest.raises(ConfigError, match="trainer.inflight_updates"):
        make_cfg(tmp_path, "trainer.inflight_updates=true")  # sync
    with pytest.raises(ConfigError, match="rollout.inflight_kv"):
        make_cfg(tmp_path, "rollout.inflight_kv=drop")
