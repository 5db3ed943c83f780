"""Both families of driver-side groups (Ray: rlpost.workers; in-process: rlpost.local,
rlpost.envs.runner) keep the Protocols of rlpost.groups, method for method: every
method exists and accepts the Protocol's parameters by name (extra ones need defaults)."""

from __future__ import annotations

import inspect

import pytest

from rlpost import groups
from rlpost.envs.agent import LocalAgentPool
from rlpost.envs.runner import LocalEnvPool
from rlpost.local import LocalCriticGroup, LocalRewardPool, LocalRolloutGroup, LocalTrainerGroup, LocalWeightSync
from rlpost.workers.agent_pool import AgentPool
from rlpost.workers.colocation import ColocatedWeightSync
from rlpost.workers.critic_group import CriticGroup
from rlpost.workers.env_pool import EnvPool
from rlpost.workers.reward_pool import RewardPool
from rlpost.workers.rollout_group import RolloutGroup
from rlpost.workers.trainer_group import TrainerGroup
from rlpost.workers.weight_sync_link import WeightSyncLink

IMPLEMENTATIONS = {
    groups.TrainerGroupLike: [TrainerGroup, LocalTrainerGroup],
    groups.CriticGroupLike: [CriticGroup, LocalCriticGroup],
    groups.RolloutGroupLike: [RolloutGroup, LocalRolloutGroup],
    groups.RewardPoolLike: [RewardPool, LocalRewardPool],
    groups.EnvPoolLike: [EnvPool, LocalEnvPool],
    groups.AgentPoolLike: [AgentPool, LocalAgentPool],
    groups.WeightSyncLike: [WeightSyncLink, LocalWeightSync, ColocatedWeightSync],
}


def _members(protocol) -> dict[str, object]:
    return {name: value for name, value in vars(protocol).items()
            if not name.startswith("_") and (callable(value) or isinstance(value, property))}


def _problems(protocol, impl) -> list[str]:
    out = []
    for name, member in _members(protocol).items():
        got = inspect.getattr_static(impl, name, None)
        if got is None:
            out.append(f"{impl.__name__}.{name} is missing")
            continue
        if isinstance(member, property):
            if not isinstance(got, property):
                out.append(f"{impl.__name__}.{name} must be a property")
            continue
        want = list(inspect.signature(member).parameters.values())[1:]
        have = dict(list(inspect.signature(got).parameters.items())[1:])
        for p in want:
            if p.name not in have:
                out.append(f"{impl.__name__}.{name} lacks parameter {p.name!r}")
            elif p.default is not inspect.Parameter.empty and have[p.name].default is inspect.Parameter.empty:
                out.append(f"{impl.__name__}.{name}: {p.name!r} needs a default, as in the Protocol")
        names = {p.name for p in want}
        for extra, p in have.items():
            if extra not in names and p.default is inspect.Parameter.empty and p.kind not in (
                    p.VAR_POSITIONAL, p.VAR_KEYWORD):
                out.append(f"{impl.__name__}.{name} requires {extra!r}, which callers of the Protocol never pass")
    return out


@pytest.mark.parametrize("protocol", list(IMPLEMENTATIONS), ids=lambda p: p.__name__)
def test_every_implementation_keeps_the_protocol(protocol):
    problems = [msg for impl in IMPLEMENTATIONS[protocol] for msg in _problems(protocol, impl)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_drift():
    class Drifted:
        def score(self, batch):  # renamed parameter
            return []

    assert _problems(groups.RewardPoolLike, Drifted) == [
        "Drifted.score lacks parameter 'items'", "Drifted.score requires 'batch', which callers of the Protocol never pass",
        "Drifted.shutdown is missing"]
