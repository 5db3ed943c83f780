"""Checked by mypy (tests/unit/test_types.py), never run: each driver-side group, Ray and
in-process, must be assignable to its Protocol in rlpost.groups, parameter types included."""

from __future__ import annotations

from rlpost.envs.agent import LocalAgentPool
from rlpost.envs.runner import LocalEnvPool
from rlpost.groups import (AgentPoolLike, CriticGroupLike, EnvPoolLike, RewardPoolLike, RolloutGroupLike, TrainerGroupLike,
                           WeightSyncLike)
from rlpost.local import LocalCriticGroup, LocalRewardPool, LocalRolloutGroup, LocalTrainerGroup, LocalWeightSync
from rlpost.workers.agent_pool import AgentPool
from rlpost.workers.colocation import ColocatedWeightSync
from rlpost.workers.critic_group import CriticGroup
from rlpost.workers.env_pool import EnvPool
from rlpost.workers.reward_pool import RewardPool
from rlpost.workers.rollout_group import RolloutGroup
from rlpost.workers.trainer_group import TrainerGroup
from rlpost.workers.weight_sync_link import WeightSyncLink


def ray_groups(trainer: TrainerGroup, critic: CriticGroup, rollout: RolloutGroup, rewards: RewardPool,
               envs: EnvPool, link: WeightSyncLink, colocated: ColocatedWeightSync, agents: AgentPool) -> None:
    _trainer: TrainerGroupLike = trainer
    _critic: CriticGroupLike = critic
    _rollout: RolloutGroupLike = rollout
    _rewards: RewardPoolLike = rewards
    _envs: EnvPoolLike = envs
    _agents: AgentPoolLike = agents
    _link: WeightSyncLike = link
    _colocated: WeightSyncLike = colocated


def local_groups(trainer: LocalTrainerGroup, critic: LocalCriticGroup, rollout: LocalRolloutGroup,
                 rewards: LocalRewardPool, envs: LocalEnvPool, sync: LocalWeightSync, agents: LocalAgentPool) -> None:
    _trainer: TrainerGroupLike = trainer
    _critic: CriticGroupLike = critic
    _rollout: RolloutGroupLike = rollout
    _rewards: RewardPoolLike = rewards
    _envs: EnvPoolLike = envs
    _agents: AgentPoolLike = agents
    _sync: WeightSyncLike = sync
