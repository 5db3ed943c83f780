"""Algorithm functions against values computed by hand."""

import functools
import math

import pytest
import torch

from rlpost.algorithms import grpo_advantages, kl_k1, kl_k2, kl_k3, ppo_clip_loss, token_mean
from rlpost.algorithms.grpo import grpo_loss
from rlpost.config.schema import AlgorithmConfig
from rlpost.types import ModelOutput, TrainBatch


def test_grpo_advantages_normalised_by_unbiased_std():
    # mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), torch.ones(1, 4, dtype=torch.bool))
    expected = 0.5 / math.sqrt(1 / 3)
    assert torch.allclose(adv, torch.tensor([[expected, -expected, -expected, expected]]), atol=1e-5)


def test_grpo_advantages_mean_only():
    adv = grpo_advantages(torch.tensor([[3.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool), norm_by_std=False)
    assert torch.equal(adv, torch.tensor([[1.0, -1.0]]))


def test_grpo_equal_rewards_and_group_of_one_give_zero_without_nan():
    adv = grpo_advantages(torch.tensor([[1.0, 1.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool))
    assert torch.equal(adv, torch.zeros(1, 3))
    single = grpo_advantages(torch.tensor([[2.0]]), torch.ones(1, 1, dtype=torch.bool))
    assert torch.equal(single, torch.zeros(1, 1))


def test_grpo_invalid_samples_are_left_out_of_group_statistics():
    # valid rewards 1 and 0: mean 0.5, unbiased std sqrt(0.5); the invalid 5.0 is ignored
    rewards = torch.tensor([[1.0, 0.0, 5.0]])
    valid = torch.tensor([[True, True, False]])
    adv = grpo_advantages(rewards, valid)
    s = 0.5 / math.sqrt(0.5)
    assert torch.allclose(adv, torch.tensor([[s, -s, 0.0]]), atol=1e-5)
    only_one = grpo_advantages(rewards, torch.tensor([[True, False, False]]))
    assert torch.equal(only_one, torch.zeros(1, 3))


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    l2 = math.log(2.0)
    assert kl_k1(logp, ref).item() == pytest.approx(l2)
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * l2**2)
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 - 1 + l2)
    assert kl_k3(ref, ref).item() == 0.0


def test_ppo_clip_four_cases():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = ppo_clip_loss(ratio.log(), torch.zeros(4), adv, clip_eps_low=0.2, clip_eps_high=0.2)
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8]), atol=1e-6)
    assert torch.equal(clipped, torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_clip_higher_uses_separate_bounds():
    loss, _ = ppo_clip_loss(torch.tensor([1.5]).log(), torch.zeros(1), torch.ones(1), clip_eps_low=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-1.28)


def test_token_mean_uses_the_global_count():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert token_mean(values, mask, 3.0).item() == pytest.approx((1 + 2 + 4) / 3)
    # two halves each divided by the global count add up to the whole
    halves = token_mean(values[:1], mask[:1], 3.0) + token_mean(values[1:], mask[1:], 3.0)
    assert halves.item() == pytest.approx((1 + 2 + 4) / 3)
    with pytest.raises(ValueError):
        token_mean(values, mask, 0.0)


def _batch(rows=4, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rows, width, generator=g) > 0.3).float()
    mask[0] = 0.0  # a fully masked sequence contributes nothing
    return TrainBatch(
        input_ids=torch.zeros(rows, width, dtype=torch.long),
        attention_mask=torch.ones(rows, width, dtype=torch.long),
        loss_mask=mask,
        advantages=torch.randn(rows, width, generator=g),
        old_logprobs=-torch.rand(rows, width, generator=g),
        ref_logprobs=-torch.rand(rows, width, generator=g),
        global_num_tokens=float(mask.sum()),
    )


def test_grpo_loss_micro_batch_split_gives_the_same_gradient():
    cfg = AlgorithmConfig(kl_coef=0.1, entropy_coef=0.01)
    batch = _batch()
    base = (batch.old_logprobs + 0.1 * torch.randn(batch.input_ids.shape)).detach()
    entropy = torch.rand(batch.input_ids.shape)
    loss_fn = functools.partial(grpo_loss, cfg)

    whole = base.clone().requires_grad_()
    loss, metrics = loss_fn(ModelOutput(whole, entropy), batch)
    loss.backward()

    split = base.clone().requires_grad_()
    summed = {}
    for idx in (slice(0, 1), slice(1, 3), slice(3, 4)):
        part_loss, part_metrics = loss_fn(ModelOutput(split[idx], entropy[idx]), batch.select(idx))
        part_loss.backward()
        for k, v in part_metrics.items():
            summed[k] = summed.get(k, 0.0) + v
    assert torch.allclose(whole.grad, split.grad, atol=1e-6)
    for key in metrics:
        assert summed[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert whole.grad[0].abs().sum() == 0  # the fully masked row gets no gradient


def test_grpo_loss_on_policy_equals_minus_mean_advantage():
    # ratio 1 everywhere: loss = -(sum A * mask) / N, clip fraction 0
    batch = _batch()
    out = ModelOutput(batch.old_logprobs.clone(), None)
    loss, metrics = grpo_loss(AlgorithmConfig(), out, batch)
    expected = -(batch.advantages * batch.loss_mask).sum() / batch.global_num_tokens
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert metrics["policy/clip_frac"] == 0.0
