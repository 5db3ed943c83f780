"""The Algorithm object (rlpost.algorithms.algorithm, registry.py): nothing outside
rlpost/algorithms/ compares estimator or algorithm names, the registry validates
``algorithm.name``, every recipe's algorithm declares what its step needs, and the
object's advantages match hand-computed numbers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from rlpost.algorithms import ADVANTAGE_ESTIMATORS, ALGORITHMS, make_algorithm
from rlpost.algorithms.algorithm import PPO, AdvantageInputs, Algorithm, ReinforcePP, ReMax
from rlpost.config.load import group_options, load_config
from rlpost.config.schema import AlgorithmConfig
from rlpost.errors import ConfigError
from rlpost.types import TrainBatch

PACKAGE = Path(__file__).resolve().parents[2] / "rlpost"
NAMES = set(ADVANTAGE_ESTIMATORS) | set(ALGORITHMS)


def _names_in(node: ast.AST) -> list[str]:
    """Estimator/algorithm names written as string constants in ``node`` (alone or in
    a tuple/list/set literal)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and i.value in NAMES]


def algorithm_branches(source: str, filename: str) -> list[str]:
    """``file:line`` of every place that branches on the algorithm by name: a read of
    ``.adv_estimator``, or a comparison (==, !=, in, ...) with an estimator or
    algorithm name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and node.attr == "adv_estimator":
            found.append(f"{filename}:{node.lineno}: reads .adv_estimator")
        elif isinstance(node, ast.Compare):
            names = [n for operand in (node.left, *node.comparators) for n in _names_in(operand)]
            if names:
                found.append(f"{filename}:{node.lineno}: compares with {names}")
    return found


def test_the_scanner_finds_name_branches():
    bad = ('if cfg.algorithm.adv_estimator == "gae":\n    pass\n'
           'x = name in ("remax", "other")\n'
           'y = "ppo" != kind\n')
    assert sorted(algorithm_branches(bad, "bad.py")) == [
        "bad.py:1: compares with ['gae']", "bad.py:1: reads .adv_estimator",
        "bad.py:3: compares with ['remax']", "bad.py:4: compares with ['ppo']"]
    fine = 'if algorithm.needs_critic:\n    pass\nlabel = "grpo"\nok = mode == "sync"\n'
    assert algorithm_branches(fine, "fine.py") == []


def test_no_estimator_name_comparison_outside_the_algorithms_package():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "algorithms") in path.parents:
            continue
        found += algorithm_branches(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not found, "ask the Algorithm object (rlpost.algorithms.make_algorithm) instead:\n" + "\n".join(found)


# ------------------------------------------------------------------ registry
def test_unknown_name_lists_the_registered_algorithms():
    with pytest.raises(ConfigError, match=r"algorithm\.name: unknown algorithm 'grpoo'.*'dapo'.*'ppo'"):
        load_config(["algorithm.name=grpoo"])


def test_an_explicit_estimator_or_loss_replaces_the_algorithms_own():
    assert make_algorithm(AlgorithmConfig(name="ppo")).estimator == "gae"
    default = make_algorithm(AlgorithmConfig())
    assert (type(default), default.estimator, default.policy_loss) == (Algorithm, "grpo", "ppo_clip")
    # configs written before the registry: adv_estimator on the default name
    legacy = make_algorithm(AlgorithmConfig(adv_estimator="gae"))
    assert isinstance(legacy, PPO) and legacy.name == "grpo"
    assert make_algorithm(AlgorithmConfig(policy_loss="cispo")).policy_loss == "cispo"
    with pytest.raises(ConfigError, match=r"algorithm\.policy_loss: must be null \(grpo's own, ppo_clip\)"):
        make_algorithm(AlgorithmConfig(policy_loss="nope"))


@pytest.mark.parametrize("recipe", group_options("recipe"))
def test_every_recipe_names_a_registered_algorithm_that_declares_its_needs(recipe):
    cfg = load_config([f"+recipe={recipe}"])
    algorithm = make_algorithm(cfg.algorithm)
    assert algorithm.needs_critic == (recipe == "ppo_math")
    assert algorithm.greedy_baseline == (recipe == "remax_math")
    assert algorithm.needs_reference == (cfg.algorithm.kl_coef > 0)
    if recipe == "reinforce_pp_math":
        assert isinstance(algorithm, ReinforcePP)


def test_single_turn_only_algorithms_say_why():
    assert ReMax.single_turn_only and PPO.single_turn_only and Algorithm.single_turn_only is None
    with pytest.raises(ConfigError, match="PPO's per-token values .* single-turn only"):
        load_config(["rollout.max_turns=2", "algorithm.name=ppo"])


# --------------------------------------------------------------- advantages
def _batch() -> TrainBatch:
    """Two rows of one group: prompt token, then 2 and 1 completion tokens."""
    ids = torch.tensor([[1, 3, 4], [1, 3, 0]])
    return TrainBatch(input_ids=ids, attention_mask=(ids > 0).long(),
                      loss_mask=torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]),
                      old_logprobs=torch.tensor([[0.0, -1.0, -1.0], [0.0, -1.0, 0.0]]),
                      ref_logprobs=torch.tensor([[0.0, -2.0, -2.0], [0.0, -2.0, 0.0]]))


def test_outcome_advantages_broadcast_over_each_rows_tokens():
    # GRPO, rewards (1, 0): mean 0.5, unbiased std sqrt(0.5) = 0.7071, A = +-0.7071 (eps 1e-6)
    out = make_algorithm(AlgorithmConfig()).advantages(_batch(), AdvantageInputs(torch.tensor([[1.0, 0.0]]), 0.0))
    a = 0.5 / (0.5 ** 0.5 + 1e-6)
    assert out.advantages == pytest.approx(torch.tensor([[0.0, a, a], [0.0, -a, 0.0]]))
    assert out.returns is None


def test_reinforce_pp_with_the_kl_in_the_reward_works_per_token():
    cfg = AlgorithmConfig(name="reinforce_pp", kl_in_reward=True, kl_coef=0.1, kl_estimator="k1")
    inputs = AdvantageInputs(torch.tensor([[1.0, 0.0]]), kl_coef=0.1)
    out = make_algorithm(cfg).advantages(_batch(), inputs).advantages
    # k1 KL = 1 on every token, so -0.1 each; score on the last token; returns to go
    # (gamma 1): row 0 (0.8, 0.9), row 1 (-0.1). Mean 1.6 / 3 = 0.5333; unbiased var
    # (0.2667^2 + 0.3667^2 + 0.6333^2) / 2 = 0.2717, std 0.5212.
    mean, std = 1.6 / 3, ((0.8 - 1.6 / 3) ** 2 + (0.9 - 1.6 / 3) ** 2 + (-0.1 - 1.6 / 3) ** 2) ** 0.5 / 2 ** 0.5
    expected = torch.tensor([[0.0, 0.8, 0.9], [0.0, -0.1, 0.0]])
    expected = (expected - mean) / (std + 1e-8) * _batch().loss_mask
    assert out == pytest.approx(expected, abs=1e-5)
    # without the reference (kl_coef 0) the same algorithm runs its outcome estimator:
    # batch-normalised rewards, the same +-0.7071 as GRPO for one group of two
    no_ref = _batch()
    no_ref.ref_logprobs = None
    outcome = make_algorithm(cfg).advantages(no_ref, inputs).advantages
    assert outcome[0, 1].item() == pytest.approx(0.5 / (0.5 ** 0.5 + 1e-6))
