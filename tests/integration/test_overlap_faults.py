"""Faults in the overlapped modes (``trainer.mode=one_step_off|async``) of real runs of
``python -m rlpost.train`` (Ray, FSDP2, HF replicas, tiny model): a rollout replica
killed by pid mid-run is replaced as in sync mode, and an async run SIGKILLed after a
checkpoint resumes with ``resume=auto``. Two driver threads use the groups here (the
rollout producer and the trainer), so which one meets a death depends on timing; the
runs are not compared number for number with an uninterrupted one (an async run is not
repeatable, and a replacement's weights may be newer than their label, see
``rlpost.workers.weight_sync_link``), only checked to finish every step once."""

from __future__ import annotations

import json
import os
import re
import signal
import threading

import pytest
from test_fault_tolerance import Run, metric_rows

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["one_step_off", "async"])
def test_rollout_replica_killed_in_an_overlapped_run_is_replaced(mode, tmp_path):
    out = tmp_path / mode
    run = Run(out, f"trainer.mode={mode}", "trainer.max_staleness=2")
    try:
        victim = run.pids("rollout replica")[1]
        run.wait_until(lambda: any(r["step"] == 1 for r in metric_rows(out)), "step 1")
        # one_step_off: batch 3 is being sampled while step 2 trains, so the producer
        # thread usually meets the death and resyncs while the trainer thread trains.
        os.kill(victim, signal.SIGKILL)
    finally:
        rc = run.finish()
    assert rc == 0, run.output[-4000:]
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # One death, one replacement, whichever thread saw it (or both).
    assert rows[0]["rollout/actor_restarts"] == 0 and rows[-1]["rollout/actor_restarts"] == 1
    assert all(r["trainer/restarts"] == 0 and r["reward/errors"] == 0 for r in rows)
    assert all(r["async/staleness_max"] <= 2 for r in rows)
    noticed = re.findall(r"(.*): started a replacement for replica 1", run.output)
    assert len(noticed) == 1, run.output[-4000:]
    print(f"{mode}: {noticed[0]}")  # which thread met the death: 'died during generate' is the producer


def test_async_run_sigkilled_after_a_checkpoint_resumes(tmp_path):
    out = tmp_path / "async"
    extra = ["trainer.mode=async", "trainer.max_staleness=2", "trainer.save_every=1"]
    run = Run(out, *extra)
    try:
        marker = out / "checkpoints" / "latest"
        run.wait_until(lambda: marker.exists() and marker.read_text().strip() == "step_000002", "the step-2 checkpoint")
        os.kill(run.proc.pid, signal.SIGKILL)
    finally:
        rc = run.finish()
    assert rc == -signal.SIGKILL and not (out / "final").exists()
    latest = out / "checkpoints" / marker.read_text().strip()
    saved = json.loads((latest / "controller.json").read_text())["overlap"]
    assert saved["mode"] == "async" and saved["produced"] >= saved["buffered"] + 2
    resumed = Run(out, *extra, "resume=auto")
    assert resumed.finish() == 0, resumed.output[-4000:]
    found = re.search(r"resumed from .*step_00000(\d) at step (\d)", resumed.output)
    assert found and found.group(1) in "23", resumed.output[-4000:]
    rows = metric_rows(out)
    # Every step once (the resumed run replaced the lines after its checkpoint), none
    # trained on samples staler than the bound, the batches buffered in the checkpoint
    # included; the final weights were exported.
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["async/staleness_max"] <= 2 for r in rows)
    assert (out / "final").is_dir()


def test_one_death_seen_by_two_threads_is_replaced_once(tmp_path):
    """The producer's ``generate`` and the trainer thread's weight push can both meet the
    same dead replica; each reports the generations it saw and only the first replaces."""
    import ray

    from rlpost.config.load import load_config
    from rlpost.faults import FaultCounts
    from rlpost.models.loading import resolve_model_path
    from rlpost.types import SamplingParams
    from rlpost.workers.rollout_group import RolloutGroup

    cfg = load_config(["+recipe=grpo_math", "rollout.engine=hf", "rollout.replicas=1", "rollout.max_restarts=2"])
    model_path = resolve_model_path(cfg.model.path)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    group = None
    try:
        faults = FaultCounts()
        group = RolloutGroup(cfg, model_path, faults)
        resyncs = []
        group.set_resync(lambda: resyncs.append(group.pids()))
        [victim] = group.pids()
        _, seen = group.members()
        os.kill(victim, signal.SIGKILL)
        callers = [threading.Thread(target=group.replace, args=([0], f"caller {i}", seen)) for i in range(2)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(300)
        assert faults.counts["rollout/actor_restarts"] == 1 and group.generations == [1] and group.restarts == 1
        assert len(resyncs) == 1 and victim not in resyncs[0]
        # A caller that looks again sees the new generation and would replace it (a second death).
        assert group.members()[1] == [1]
        assert group.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4, seed=1))[0]
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()
