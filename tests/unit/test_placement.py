"""Placement keys: ``auto`` GPU counts resolve from the cluster's GPUs (never the
driver's), the launchers size jobs with the same rule, and bad values name the key."""

import pytest

from rlpost.config.load import load_config
from rlpost.errors import ConfigError
from rlpost.launch.resources import job_needs
from rlpost.workers.placement import backend_for, gpus_of, resolve_gpus


def test_auto_follows_the_cluster_numbers_stay():
    assert gpus_of("auto", cluster_gpus=8.0) == 1
    assert gpus_of("auto", cluster_gpus=0.0) == 0
    assert gpus_of(0.5, cluster_gpus=0.0) == 0.5  # explicit numbers are never overridden
    assert gpus_of(0, cluster_gpus=8.0) == 0


def test_resolve_rewrites_every_auto_key():
    cfg = load_config(["rollout.gpus_per_replica=0.5"])
    resolve_gpus(cfg, cluster_gpus=2.0)
    assert (cfg.trainer.gpus_per_rank, cfg.rollout.gpus_per_replica, cfg.critic.gpus_per_rank) == (1, 0.5, 1)
    cfg = load_config([])
    resolve_gpus(cfg, cluster_gpus=0.0)
    assert (cfg.trainer.gpus_per_rank, cfg.rollout.gpus_per_replica, cfg.critic.gpus_per_rank) == (0, 0, 0)


def test_job_needs_uses_the_per_group_counts():
    # 2 ranks x 1 + 3 replicas x 0.5 = 3.5 -> 4 GPUs; a CPU cluster resolves auto to 0
    # but keeps the explicit 0.5s: ceil(1.5) = 2.
    cfg = load_config(["trainer.world_size=2", "rollout.replicas=3", "rollout.gpus_per_replica=0.5",
                       "data.train_batch_size=2"])
    assert job_needs(cfg, with_gpus=True).gpus == 4
    assert job_needs(cfg, with_gpus=False).gpus == 2
    # PPO's critic ranks count with critic.gpus_per_rank: 2 + 2 x 2 (critic) = 6 with 0 replica GPUs.
    ppo = load_config(["trainer.world_size=2", "rollout.gpus_per_replica=0", "critic.gpus_per_rank=2",
                       "algorithm.adv_estimator=gae", "data.train_batch_size=2"])
    assert job_needs(ppo, with_gpus=True).gpus == 6


def test_backend_follows_the_device():
    import torch

    assert backend_for(torch.device("cuda", 0)) == "nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


@pytest.mark.parametrize("override, key", [
    ("trainer.gpus_per_rank=two", "trainer.gpus_per_rank"),
    ("rollout.gpus_per_replica=-1", "rollout.gpus_per_replica"),
    ("critic.gpus_per_rank=many", "critic.gpus_per_rank"),
    ("trainer.placement_strategy=packed", "trainer.placement_strategy"),
    ("rollout.placement_strategy=random", "rollout.placement_strategy"),
    ("trainer.resources={node_a:0}", "trainer.resources"),
    ("rollout.resources={GPU:1}", "rollout.resources"),
    ("ray.placement_timeout_s=0", "ray.placement_timeout_s"),
])
def test_bad_placement_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([override])


def test_resources_pin_to_custom_resources():
    cfg = load_config(["trainer.resources={node_a:1}", "rollout.resources={node_b:0.5}"])
    assert cfg.trainer.resources == {"node_a": 1} and cfg.rollout.resources == {"node_b": 0.5}
    assert cfg.critic.resources is None
