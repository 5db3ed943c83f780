"""Off-policy corrections (``rlpost.algorithms.off_policy``, ``algorithm.off_policy``):
each weight and metric against a hand computation on a two-row batch, the loss and its
gradient through ``policy_loss_fn``, and the config keys.

The batch: two rows of four positions. Row 0 is a prompt token then three completion
tokens whose log-ratios ``log pi_old - log pi_rollout`` are 0.5, -0.5, 1.0; row 1 is a
prompt token, two completion tokens with log-ratios -1.0, 0.2, and one padding
position whose "log-ratio" (-3) must never be read. So the token ratios are
e^0.5 = 1.6487, e^-0.5 = 0.6065, e^1 = 2.7183 | e^-1 = 0.3679, e^0.2 = 1.2214, and the
sequence (geometric-mean) ratios e^(1/3) = 1.3956 and e^(-0.8/2) = e^-0.4 = 0.6703.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.algorithms import (
    OffPolicyCorrection,
    PolicyLossSpec,
    make_algorithm,
    make_policy_loss_fn,
    off_policy_metrics,
    off_policy_weights,
    policy_loss_fn,
)
from rlpost.algorithms.off_policy import correction_of
from rlpost.algorithms.on_policy import old_logprob_plan
from rlpost.config.load import load_config
from rlpost.engines.base import ModelOutput
from rlpost.errors import ConfigError
from rlpost.types import TrainBatch

E = math.exp
OLD = torch.tensor([[-1.0, -1.0, -2.0, -0.5],
                    [-1.0, -2.0, -0.8, -3.0]])
ROLLOUT = torch.tensor([[-9.0, -1.5, -1.5, -1.5],  # the prompt position differs too: never read
                        [-9.0, -1.0, -1.0, 0.0]])
MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0],
                     [0.0, 1.0, 1.0, 0.0]])
ADV = torch.tensor([[0.0, 1.0, -2.0, 0.5],
                    [0.0, 1.0, 1.0, 0.0]])
N_TOKENS = 5.0
TOKEN_RATIOS = [E(0.5), E(-0.5), E(1.0), E(-1.0), E(0.2)]
SEQ_RATIOS = [E(1 / 3), E(-0.4)]


def weights_at_loss_tokens(kind: str, **bounds) -> list[float]:
    weight, _, _ = off_policy_weights(OffPolicyCorrection(kind, **bounds), OLD, ROLLOUT, MASK)
    return weight[MASK > 0].tolist()


def test_token_tis_truncates_each_token_ratio_at_the_cap():
    assert weights_at_loss_tokens("token_tis", cap=2.0) == pytest.approx([E(0.5), E(-0.5), 2.0, E(-1.0), E(0.2)])


def test_token_mask_keeps_the_ratio_inside_the_band_and_zeroes_the_rest():
    # e^1 is above 2, e^-1 below 0.5: both masked (IcePop's M(k) = k inside [alpha, beta]).
    assert weights_at_loss_tokens("token_mask", low=0.5, high=2.0) == pytest.approx(
        [E(0.5), E(-0.5), 0.0, 0.0, E(0.2)])


def test_seq_tis_puts_the_truncated_geometric_mean_on_every_token():
    # Row 0: e^(1/3) = 1.3956 > 1.2 -> 1.2; row 1: e^-0.4 = 0.6703 is kept.
    assert weights_at_loss_tokens("seq_tis", cap=1.2) == pytest.approx([1.2, 1.2, 1.2, E(-0.4), E(-0.4)])


def test_seq_mask_drops_whole_sequences_outside_the_band():
    # Row 1's e^-0.4 = 0.6703 is below 0.7: the whole sequence goes.
    assert weights_at_loss_tokens("seq_mask", low=0.7, high=2.0) == pytest.approx([E(1 / 3)] * 3 + [0.0, 0.0])
    # A band that holds both leaves the geometric means as weights.
    assert weights_at_loss_tokens("seq_mask", low=0.5, high=2.0) == pytest.approx([E(1 / 3)] * 3 + [E(-0.4)] * 2)


def test_none_weighs_every_token_one():
    assert weights_at_loss_tokens("none") == [1.0] * 5


@pytest.mark.parametrize("kind, bounds, expected", [
    ("token_tis", {"cap": 2.0}, {"off_policy/ratio_mean": sum(TOKEN_RATIOS) / 5, "off_policy/ratio_min": E(-1.0),
                                 "off_policy/ratio_max": E(1.0), "off_policy/capped_frac": 1 / 5}),
    ("token_mask", {"low": 0.5, "high": 2.0}, {"off_policy/ratio_mean": sum(TOKEN_RATIOS) / 5,
                                               "off_policy/ratio_min": E(-1.0), "off_policy/ratio_max": E(1.0),
                                               "off_policy/masked_frac": 2 / 5}),
    ("seq_tis", {"cap": 1.2}, {"off_policy/ratio_mean": sum(SEQ_RATIOS) / 2, "off_policy/ratio_min": E(-0.4),
                               "off_policy/ratio_max": E(1 / 3), "off_policy/capped_frac": 1 / 2}),
    ("seq_mask", {"low": 0.7, "high": 2.0}, {"off_policy/ratio_mean": sum(SEQ_RATIOS) / 2,
                                             "off_policy/ratio_min": E(-0.4), "off_policy/ratio_max": E(1 / 3),
                                             "off_policy/masked_frac": 1 / 2}),
])
def test_metrics_describe_the_ratios_over_the_units_weighed(kind, bounds, expected):
    metrics = off_policy_metrics(OffPolicyCorrection(kind, **bounds), OLD, ROLLOUT, MASK)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key


def test_a_row_without_loss_tokens_takes_no_part():
    # Row 1's loss mask zeroed (a failed reward): only row 0's ratios count.
    mask = MASK * torch.tensor([[1.0], [0.0]])
    seq = off_policy_metrics(OffPolicyCorrection("seq_mask", low=0.7, high=2.0), OLD, ROLLOUT, mask)
    assert seq["off_policy/ratio_max"] == seq["off_policy/ratio_min"] == pytest.approx(E(1 / 3))
    assert seq["off_policy/masked_frac"] == 0.0
    token = off_policy_metrics(OffPolicyCorrection("token_mask", low=0.5, high=2.0), OLD, ROLLOUT, mask)
    assert token["off_policy/ratio_min"] == pytest.approx(E(-0.5)) and token["off_policy/masked_frac"] == pytest.approx(1 / 3)
    assert off_policy_metrics(OffPolicyCorrection("token_tis"), OLD, ROLLOUT, torch.zeros_like(MASK)) == {}


def _batch(old_logprobs):
    return TrainBatch(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
                      loss_mask=MASK, advantages=ADV, old_logprobs=old_logprobs, rollout_logprobs=ROLLOUT,
                      global_num_tokens=N_TOKENS, global_num_seqs=2.0)


@pytest.mark.parametrize("kind, bounds, weights", [
    ("token_tis", {"cap": 2.0}, [[0, E(0.5), E(-0.5), 2.0], [0, E(-1.0), E(0.2), 0]]),
    ("token_mask", {"low": 0.5, "high": 2.0}, [[0, E(0.5), E(-0.5), 0.0], [0, 0.0, E(0.2), 0]]),
    ("seq_tis", {"cap": 1.2}, [[0, 1.2, 1.2, 1.2], [0, E(-0.4), E(-0.4), 0]]),
    ("seq_mask", {"low": 0.7, "high": 2.0}, [[0, E(1 / 3), E(1 / 3), E(1 / 3)], [0, 0.0, 0.0, 0]]),
])
def test_loss_and_gradient_are_weighed_only_at_kept_loss_tokens(kind, bounds, weights):
    # On-policy for the trainer (old_logprobs=None: the detached training forward is
    # pi_old), so ppo_clip's per-token loss is -A and d loss / d logp_t = -w_t A_t / N
    # with the weight a constant: a weight with a gradient of its own (it is computed
    # from logp here) would add terms, and padding/prompt/masked tokens must get none.
    w = torch.tensor(weights)
    logp = OLD.clone().requires_grad_()
    spec = PolicyLossSpec(off_policy=OffPolicyCorrection(kind, **bounds))
    loss, metrics = policy_loss_fn(spec, ModelOutput(logp, None), _batch(None))
    assert loss.item() == pytest.approx(-(w * ADV).sum().item() / N_TOKENS, rel=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, -w * ADV / N_TOKENS, atol=1e-7)
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0 and logp.grad[1, 3] == 0  # prompt and padding
    assert "policy/tis_ratio_mean" in metrics if kind == "token_tis" else "policy/tis_ratio_mean" not in metrics


@pytest.mark.parametrize("kind", ["token_tis", "token_mask", "seq_tis", "seq_mask"])
def test_a_skipped_pass_weighs_like_the_pass(kind):
    # old_logprobs from a pass on the weights being trained (== this forward's values)
    # and old_logprobs=None (this forward, detached): same loss, gradient and metrics.
    spec = PolicyLossSpec(off_policy=OffPolicyCorrection(kind, cap=1.5, low=0.5, high=2.0))
    results = []
    for old in (OLD.clone(), None):
        logp = OLD.clone().requires_grad_()
        loss, metrics = policy_loss_fn(spec, ModelOutput(logp, None), _batch(old))
        loss.backward()
        results.append((loss.item(), logp.grad, metrics))
    (loss_a, grad_a, m_a), (loss_b, grad_b, m_b) = results
    assert loss_a == loss_b and torch.equal(grad_a, grad_b) and m_a == m_b


def test_tis_cap_is_token_tis():
    # The older key gives the same loss as the new spelling, and the same metrics under the old names.
    out = ModelOutput(OLD.clone(), None)
    old_key = policy_loss_fn(PolicyLossSpec(tis_cap=2.0), out, _batch(OLD))
    new_key = policy_loss_fn(PolicyLossSpec(off_policy=OffPolicyCorrection("token_tis", cap=2.0)), out, _batch(OLD))
    assert old_key[0].item() == new_key[0].item()
    assert old_key[1]["policy/tis_capped_frac"] == new_key[1]["policy/tis_capped_frac"] == pytest.approx(1 / 5)


# ------------------------------------------------------------------ config
def test_config_keys_reach_the_loss_and_the_old_logprob_plan():
    cfg = load_config(["algorithm.off_policy.correction=token_mask", "algorithm.off_policy.low=0.5",
                       "algorithm.off_policy.high=5"])
    spec = make_policy_loss_fn(cfg.algorithm).args[0]
    assert spec.off_policy == OffPolicyCorrection("token_mask", cap=2.0, low=0.5, high=5.0) and spec.tis_cap is None
    # No separate old-log-prob pass for it: with one mini-batch the loss weighs the training
    # forward's detached log-probs, the values the pass would give (next test).
    assert make_algorithm(cfg.algorithm).old_logprobs_reason() is None
    assert not old_logprob_plan(cfg.algorithm, load_config(["trainer.mode=async"]).trainer).separate_pass
    assert correction_of(load_config(["algorithm.tis_cap=3"]).algorithm) == OffPolicyCorrection("token_tis", cap=3.0)
    assert not correction_of(load_config([]).algorithm).enabled
    assert make_algorithm(load_config([]).algorithm).old_logprobs_reason() is None


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.off_policy.correction=icepop"], "algorithm.off_policy.correction"),
    (["algorithm.off_policy.cap=0.5"], "algorithm.off_policy.cap"),
    (["algorithm.off_policy.low=1.2"], "algorithm.off_policy.low/high"),
    (["algorithm.off_policy.high=0.9"], "algorithm.off_policy.low/high"),
    (["algorithm.off_policy.low=-0.1"], "algorithm.off_policy.low/high"),
    (["algorithm.tis_cap=2", "algorithm.off_policy.correction=seq_tis"], "algorithm.tis_cap"),
    (["algorithm.off_policy.corection=seq_tis"], "algorithm.off_policy.correction"),  # the typo's hint
])
def test_bad_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides)
