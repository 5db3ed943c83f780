"""Colocated placement: the memory-phase state machine (pure logic, runs anywhere) and
the config checks; the GPU path itself is tested in tests/integration/test_colocate_gpu.py."""

import pytest

from rlpost.config.load import load_config
from rlpost.engines.colocate import MemoryPhases
from rlpost.errors import ConfigError


def test_memory_phases_sleep_once_and_wake_weights_before_kv_cache():
    calls = []
    phases = MemoryPhases(sleep=lambda: calls.append("sleep"), wake=lambda tags: calls.append(("wake", tags)))
    phases.to_rollout()  # starts awake: nothing to do
    phases.to_train()
    phases.to_train()  # already asleep: no second sleep
    assert calls == ["sleep"] and phases.state == "train"
    order = []
    phases._wake = lambda tags: order.append(("wake", tags))
    phases.sync(lambda: order.append("send"))
    # weights first (the update needs them resident), KV cache only after the send
    assert order == [("wake", ["weights"]), "send", ("wake", ["kv_cache"])] and phases.state == "rollout"
    order.clear()
    phases.sync(lambda: order.append("send"))  # awake already: just send
    assert order == ["send"]
    phases.to_train()
    phases.to_rollout()
    assert order[-1] == ("wake", None) and phases.state == "rollout"


def test_colocate_needs_vllm_and_one_replica_per_trainer_rank():
    with pytest.raises(ConfigError, match="rollout.colocate.*vllm"):
        load_config(["rollout.colocate=true", "rollout.engine=hf"])
    with pytest.raises(ConfigError, match="rollout.replicas=2"):
        load_config(["rollout.colocate=true", "rollout.engine=vllm", "trainer.world_size=2", "rollout.replicas=1"])
    cfg = load_config(["rollout.colocate=true", "rollout.engine=vllm", "trainer.world_size=2", "rollout.replicas=2"])
    assert cfg.rollout.colocate


def test_colocated_engine_refuses_a_machine_without_cuda(monkeypatch):
    from rlpost.engines import colocate

    monkeypatch.setattr(colocate.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        colocate.require_gpus()
