"""The algorithm registry: ``algorithm.name`` -> an ``Algorithm`` (``rlpost.algorithms.algorithm``).

Each entry names the algorithm's advantage estimator and policy loss. The config keys
``algorithm.adv_estimator`` and ``algorithm.policy_loss`` are null by default, meaning
"the algorithm's own"; set, they replace that part (``algorithm.policy_loss=cispo`` on
``grpo`` mixes and matches, and configs written before the registry, which set
``adv_estimator: gae`` on the default name, keep working).

Adding an algorithm (docs/architecture.md): a policy loss is a module in
``rlpost/algorithms/`` with a function of the ``POLICY_LOSSES`` signature, entered in
``POLICY_LOSSES`` below; then one line in ``ALGORITHMS`` and a recipe. A new way of
computing advantages is a function in ``advantages.py`` and, when the step must give
it something more than rewards (a critic, extra samples), an ``Algorithm`` subclass
entered in ``_KINDS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlpost.algorithms.advantages import ADVANTAGE_ESTIMATORS
from rlpost.algorithms.algorithm import PPO, Algorithm, ReinforcePP, ReMax
from rlpost.algorithms.gmpo import gmpo
from rlpost.algorithms.losses import cispo, gspo, ppo_clip
from rlpost.errors import ConfigError

if TYPE_CHECKING:
    from rlpost.config.schema import AlgorithmConfig

# ``(logp, old_logp, advantages, mask, **options) -> (per_token_loss[B, T], metrics)``,
# picked by ``algorithm.policy_loss`` (rlpost.algorithms.losses).
POLICY_LOSSES = {"ppo_clip": ppo_clip, "gspo": gspo, "cispo": cispo, "gmpo": gmpo}


@dataclass(frozen=True)
class AlgorithmEntry:
    estimator: str  # ADVANTAGE_ESTIMATORS name
    policy_loss: str = "ppo_clip"  # POLICY_LOSSES name
    paper: str = ""


ALGORITHMS = {
    "grpo": AlgorithmEntry("grpo", paper="Shao et al. 2024, DeepSeekMath"),
    "drgrpo": AlgorithmEntry("grpo", paper="Liu et al. 2025, Understanding R1-Zero-Like Training"),
    "dapo": AlgorithmEntry("grpo", paper="Yu et al. 2025, DAPO"),
    "gspo": AlgorithmEntry("grpo", "gspo", paper="Zheng et al. 2025, Group Sequence Policy Optimization"),
    "cispo": AlgorithmEntry("grpo", "cispo", paper="MiniMax 2025, MiniMax-M1"),
    "gmpo": AlgorithmEntry("grpo", "gmpo", paper="Zhao et al. 2025, Geometric-Mean Policy Optimization"),
    "rloo": AlgorithmEntry("rloo", paper="Ahmadian et al. 2024, Back to Basics"),
    "reinforce_pp": AlgorithmEntry("reinforce_pp", paper="Hu 2025, REINFORCE++"),
    "reinforce_pp_baseline": AlgorithmEntry("reinforce_pp_baseline", paper="Hu 2025, REINFORCE++"),
    "remax": AlgorithmEntry("remax", paper="Li et al. 2023, ReMax"),
    "ppo": AlgorithmEntry("gae", paper="Schulman et al. 2017; GAE: Schulman et al. 2016"),
}

# The Algorithm class of each estimator that changes what a step does; the others are
# outcome estimators, run by ``Algorithm`` itself.
_KINDS: dict[str, type[Algorithm]] = {"reinforce_pp": ReinforcePP, "remax": ReMax, "gae": PPO}


def make_algorithm(cfg: AlgorithmConfig) -> Algorithm:
    """The ``Algorithm`` of an ``algorithm:`` config section. Raises ``ConfigError``
    naming the key and the registered names when one is unknown."""
    if cfg.name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: unknown algorithm {cfg.name!r}; registered algorithms are "
                          f"{sorted(ALGORITHMS)} (rlpost/algorithms/registry.py)")
    entry = ALGORITHMS[cfg.name]
    if cfg.adv_estimator is not None and cfg.adv_estimator not in ADVANTAGE_ESTIMATORS:
        raise ConfigError(f"algorithm.adv_estimator: must be null ({cfg.name}'s own, {entry.estimator}) or one of "
                          f"{sorted(ADVANTAGE_ESTIMATORS)}, got {cfg.adv_estimator!r}")
    if cfg.policy_loss is not None and cfg.policy_loss not in POLICY_LOSSES:
        raise ConfigError(f"algorithm.policy_loss: must be null ({cfg.name}'s own, {entry.policy_loss}) or one of "
                          f"{sorted(POLICY_LOSSES)}, got {cfg.policy_loss!r}")
    estimator = cfg.adv_estimator or entry.estimator
    kind = _KINDS.get(estimator, Algorithm)
    return kind(name=cfg.name, estimator=estimator, policy_loss=cfg.policy_loss or entry.policy_loss, config=cfg)
