"""GMPO (rlpost/algorithms/gmpo.py): loss value, gradient and clip fraction computed by
hand, and the registry entry that recipes name."""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import ALGORITHMS, POLICY_LOSSES, make_algorithm
from rlpost.algorithms.loss_fn import PolicyLossSpec, policy_loss_fn
from rlpost.config.load import load_config
from rlpost.types import ModelOutput, TrainBatch

# Paper's range: ratios clipped to (e^-0.4, e^0.4), i.e. log ratios to [-0.4, 0.4].
EPS = 0.4
# Row 0: A = +1 on 2 tokens (third is padding), log ratios (0.2, 0.6).
# Row 1: A = -2 on 3 tokens, log ratios (-0.6, 0.1, 0.5).
OLD = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])
LOG_RATIO = torch.tensor([[0.2, 0.6, 0.0], [-0.6, 0.1, 0.5]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = torch.tensor([[1.0, 1.0, 0.0], [-2.0, -2.0, -2.0]])


def _batch() -> TrainBatch:
    ids = torch.ones(2, 3, dtype=torch.long)
    return TrainBatch(input_ids=ids, attention_mask=ids, loss_mask=MASK, advantages=ADV, old_logprobs=OLD,
                      global_num_tokens=5.0, global_num_seqs=2.0)


def test_gmpo_loss_gradient_and_clip_fraction_by_hand():
    # Row 0 (A > 0, clipped from above only): kept (0.2, 0.4), mean 0.3,
    #   J_0 = 1 * e^0.3 = 1.3498588; the 0.6 token is clipped.
    # Row 1 (A < 0, clipped from below only): kept (-0.4, 0.1, 0.5), mean 0.2 / 3,
    #   J_1 = -2 * e^(1/15) = -2 * 1.0689391; the -0.6 token is clipped, 0.5 is not.
    # seq-mean-token-mean: loss = (-J_0 - J_1) / 2 = (-1.3498588 + 2.1378782) / 2 = 0.3940097.
    # Gradient of an unclipped token: -A_i J_i/A_i / |o_i| / G:
    #   row 0: -1.3498588 / 2 / 2 = -0.3374647; row 1: 2 * 1.0689391 / 3 / 2 = 0.3563130.
    logp = (OLD + LOG_RATIO).requires_grad_()
    spec = PolicyLossSpec(policy_loss="gmpo", loss_agg="seq-mean-token-mean", clip_eps_low=EPS, clip_eps_high=EPS)
    spec.check()
    loss, metrics = policy_loss_fn(spec, ModelOutput(logprobs=logp), _batch())
    loss.backward()
    assert loss.item() == pytest.approx((-math.exp(0.3) + 2 * math.exp(1 / 15)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.3940097, abs=1e-6)
    expected = torch.tensor([[-0.3374647, 0.0, 0.0], [0.0, 0.3563130, 0.3563130]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert metrics["policy/clip_frac"] == pytest.approx(2 / 5)  # one clipped token in each row, of 5


def test_on_policy_gmpo_is_the_sequence_mean_policy_gradient():
    # Ratio 1 everywhere: J_i = A_i, loss = -(1 + -2) / 2 = 0.5; every token's gradient
    # is -A_i / |o_i| / G: row 0 -1/2/2 = -0.25, row 1 2/3/2 = 1/3.
    logp = OLD.clone().requires_grad_()
    per_token, metrics = POLICY_LOSSES["gmpo"](logp, OLD, ADV, MASK, clip_eps_low=EPS, clip_eps_high=EPS)
    loss = ((per_token * MASK).sum(-1) / MASK.sum(-1)).mean()
    loss.backward()
    assert loss.item() == pytest.approx(0.5)
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert metrics["clip_frac"].sum().item() == 0.0


def test_gmpo_is_a_registered_algorithm_with_its_recipe():
    assert ALGORITHMS["gmpo"].policy_loss == "gmpo"
    cfg = load_config(["+recipe=gmpo_math"])
    algorithm = make_algorithm(cfg.algorithm)
    assert (algorithm.name, algorithm.estimator, algorithm.policy_loss) == ("gmpo", "grpo", "gmpo")
    assert (cfg.algorithm.clip_eps_low, cfg.algorithm.clip_eps_high) == (EPS, EPS)
    assert not algorithm.needs_critic and not algorithm.greedy_baseline
