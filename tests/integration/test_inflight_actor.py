"""The rollout replica on Ray takes a weight push while its ``generate`` runs
(``RolloutActor.receive_weights`` has a concurrency group of its own): the push
completes while the request is still sampling, and the tokens after it carry the new
version. A serial actor would run the receive only after the generate, so the sender
could not finish first."""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.integration


def test_replica_loads_weights_while_it_generates():
    import ray
    from transformers import AutoModelForCausalLM

    from rlpost.config.load import load_config
    from rlpost.models.loading import resolve_model_path
    from rlpost.sync.transport import WeightSender, make_plan
    from rlpost.types import SamplingParams
    from rlpost.workers.rollout_group import RolloutActor

    cfg = load_config(["+recipe=grpo_math", "rollout.engine=hf", "rollout.batch_size=32"])
    model_path = resolve_model_path(cfg.model.path)
    weights = list(AutoModelForCausalLM.from_pretrained(model_path).state_dict().items())
    plan = make_plan([(name, t.shape, t.dtype) for name, t in weights])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        actor = RolloutActor.remote(cfg, model_path, 0)
        ray.get(actor.pid.remote())  # loaded
        connected = actor.weight_sync_connect.remote("127.0.0.1", port, 2, 60.0)
        with WeightSender("127.0.0.1", port, 2, timeout_s=60.0) as sender:
            ray.get(connected)
            # 16 chunks of 32 rows, one after the other: seconds of sampling.
            prompts = [[5 + i % 20, 6, 7] for i in range(64)]
            generating = actor.generate.remote(prompts, SamplingParams(n=8, max_new_tokens=64, seed=1))
            received = actor.receive_weights.remote(plan, 1)
            sender.send(iter(weights), plan, 1)
            assert ray.get(received, timeout=60) == 1
            ready, _ = ray.wait([generating], timeout=0)
            assert not ready, "the generate finished before the push completed: the sampler was not busy enough"
            out = ray.get(generating, timeout=300)
        versions = {v for group in out for c in group for v in c.versions()}
        assert versions <= {0, 1} and 1 in versions  # rows sampled after the load are version 1's
        assert ray.get(actor.policy_version.remote()) == 1
    finally:
        ray.shutdown()
