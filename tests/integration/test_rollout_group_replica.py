"""``RolloutGroup.generate(..., replica=i)`` on Ray runs every prompt on replica i with
that replica's seed, as ``LocalRolloutGroup`` does (the gateway's session routing)."""

from __future__ import annotations

import pytest


def test_generate_on_one_replica_matches_the_in_process_group():
    import ray

    from rlpost.config.load import load_config
    from rlpost.engines.hf_rollout import HFRolloutEngine
    from rlpost.faults import FaultCounts
    from rlpost.local import LocalRolloutGroup
    from rlpost.models.loading import resolve_model_path
    from rlpost.types import SamplingParams
    from rlpost.workers.rollout_group import RolloutGroup

    cfg = load_config(["+recipe=grpo_math", "rollout.engine=hf", "rollout.replicas=2"])
    model_path = resolve_model_path(cfg.model.path)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=7)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12]]
    local = LocalRolloutGroup([HFRolloutEngine(model_path, seed=0, num_threads=1) for _ in range(2)])
    want = [[c.token_ids for c in g] for g in local.generate(prompts, params, replica=1)]
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    group = None
    try:
        group = RolloutGroup(cfg, model_path, FaultCounts())
        got = group.generate(prompts, params, replica=1)
        assert [[c.token_ids for c in g] for g in got] == want
        # Replica 0 samples with another seed: the pinned request differs there.
        assert [[c.token_ids for c in g] for g in group.generate(prompts, params, replica=0)] != want
        with pytest.raises(ValueError, match="replica 2 does not exist"):
            group.generate(prompts, params, replica=2)
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()
