"""The algorithm family (advantage estimators, KL, policy/value losses, aggregation,
DAPO helpers) against values computed by hand, plus the micro-batch split
invariance every LossFn must have."""

import functools
import math
import pickle
from types import SimpleNamespace

import pytest
import torch

from rlpost.algorithms import (
    LOSS_AGGREGATIONS,
    OUTCOME_ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    AdaptiveKLController,
    FixedKLController,
    PolicyLossSpec,
    ValueLossSpec,
    cispo,
    clipped_value_loss,
    count_sequences,
    discounted_returns,
    dynamic_sampling_keep,
    gae,
    gspo,
    kl_k3,
    kl_penalty_rewards,
    last_token_scores,
    low_var_kl,
    make_advantage_fn,
    make_kl_controller,
    make_policy_loss_fn,
    make_value_loss_fn,
    mean_sequence_kl,
    overlong_filter_mask,
    overlong_penalty,
    policy_loss_fn,
    ppo_clip,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    reinforce_pp_kl_advantages,
    reinforce_pp_token_advantages,
    remax_advantages,
    rloo_advantages,
    value_loss_fn,
    whiten,
)
from rlpost.algorithms.grpo import grpo_loss
from rlpost.config.schema import AlgorithmConfig
from rlpost.types import ModelOutput, TrainBatch

ALL = lambda g, n: torch.ones(g, n, dtype=torch.bool)  # noqa: E731


# ------------------------------------------------------------ outcome estimators
def test_rloo_leave_one_out_baseline():
    # r = [1, 0, 0, 1]: sample 0's baseline is (0 + 0 + 1) / 3 = 1/3, sample 1's is 2/3
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), ALL(1, 4))
    assert torch.allclose(adv, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))
    # the invalid 5.0 is no one's baseline: valid 1 and 0 are each other's
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 5.0]]), torch.tensor([[True, True, False]]))
    assert torch.equal(adv, torch.tensor([[1.0, -1.0, 0.0]]))


def test_reinforce_pp_normalises_over_the_whole_batch():
    # all four rewards: mean 0.75, deviations (.25, -.75, .25, .25), unbiased var .75 / 3 = .25
    adv = reinforce_pp_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), ALL(2, 2))
    assert torch.allclose(adv, torch.tensor([[0.5, -1.5], [0.5, 0.5]]), atol=1e-5)
    # the all-equal second group is *not* zero: the statistics are the batch's
    adv = reinforce_pp_advantages(torch.tensor([[1.0, 0.0, 9.0]]), torch.tensor([[True, True, False]]))
    s = 0.5 / math.sqrt(0.5)
    assert torch.allclose(adv, torch.tensor([[s, -s, 0.0]]), atol=1e-5)


def test_reinforce_pp_baseline_group_mean_then_batch_std():
    # centred: (.5, -.5) and (0, 0); batch unbiased var = (.25 + .25) / 3 = 1/6
    adv = reinforce_pp_baseline_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), ALL(2, 2))
    s = 0.5 * math.sqrt(6)
    assert torch.allclose(adv, torch.tensor([[s, -s], [0.0, 0.0]]), atol=1e-5)


def test_remax_subtracts_the_greedy_reward():
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.2]])
    adv = remax_advantages(rewards, ALL(2, 2), baseline=torch.tensor([0.5, 0.5]))
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5], [0.0, -0.3]]))
    # a failed greedy reward leaves its group without a baseline; invalid samples get 0
    adv = remax_advantages(rewards, torch.tensor([[True, False], [True, True]]),
                           baseline=torch.tensor([0.5, 0.5]), baseline_valid=torch.tensor([True, False]))
    assert torch.allclose(adv, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    # a group of one still has a baseline
    assert remax_advantages(torch.tensor([[2.0]]), ALL(1, 1), baseline=torch.tensor([1.5])).item() == 0.5
    # all rewards equal to the greedy one: zero advantage, no NaN
    assert torch.equal(remax_advantages(torch.full((2, 3), 0.7), ALL(2, 3), baseline=torch.full((2,), 0.7)),
                       torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        remax_advantages(rewards, ALL(2, 2), baseline=torch.tensor([0.5]))


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_equal_rewards_group_of_one_and_all_invalid_give_zero_without_nan(name):
    fn = OUTCOME_ADVANTAGE_ESTIMATORS[name]
    assert torch.equal(fn(torch.full((2, 3), 0.7), ALL(2, 3)), torch.zeros(2, 3))
    assert torch.equal(fn(torch.tensor([[2.0]]), ALL(1, 1)), torch.zeros(1, 1))
    assert torch.equal(fn(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2, dtype=torch.bool)), torch.zeros(1, 2))


def test_make_advantage_fn_binds_each_estimators_options():
    cfg = AlgorithmConfig(adv_estimator="grpo", norm_adv_by_std=False)
    assert torch.equal(make_advantage_fn(cfg)(torch.tensor([[3.0, 1.0]]), ALL(1, 2)), torch.tensor([[1.0, -1.0]]))
    cfg.adv_estimator = "remax"
    out = make_advantage_fn(cfg)(torch.tensor([[3.0, 1.0]]), ALL(1, 2), baseline=torch.tensor([2.0]))
    assert torch.equal(out, torch.tensor([[1.0, -1.0]]))
    cfg.adv_estimator = "gae"
    with pytest.raises(ValueError, match="outcome"):
        make_advantage_fn(cfg)


# ----------------------------------------------------------------- token level
def test_gae_by_hand_with_prompt_position_masked():
    # mask [0, 1, 1, 1]; gamma = lam = 0.5, reward 1 on the last token, V = (9, 1, 2, 3)
    # t=3: delta = 1 - 3 = -2,            A = -2
    # t=2: delta = 0 + .5 * 3 - 2 = -.5,   A = -.5 + .25 * -2 = -1
    # t=1: delta = 0 + .5 * 2 - 1 = 0,     A = 0 + .25 * -1 = -.25
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.0, -0.25, -1.0, -2.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 0.75, 1.0, 1.0]]))


def test_gae_skips_holes_and_right_padding_and_fully_masked_rows():
    # row 0: hole at t=1 (its reward 5 and value 99 are ignored); gamma = lam = 1 so
    #        A_0 = (total masked reward 1) - V_0 = 0, A_2 = 1 - 2 = -1
    # row 1: right-padded after t=1: t=1 is terminal, A_1 = 1 - 4 = -3, A_0 = 1 - 1 = 0
    # row 2: fully masked -> zeros
    rewards = torch.tensor([[0.0, 5.0, 1.0], [0.0, 1.0, 7.0], [1.0, 1.0, 1.0]])
    values = torch.tensor([[1.0, 99.0, 2.0], [1.0, 4.0, 8.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.0, 0.0, -1.0], [0.0, -3.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_whiten_and_discounted_returns():
    # masked values 1, 2, 3: mean 2, unbiased std 1
    w = whiten(torch.tensor([[1.0, 2.0, 3.0, 50.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    assert torch.equal(whiten(torch.full((1, 3), 4.0), torch.ones(1, 3)), torch.zeros(1, 3))
    assert torch.equal(whiten(torch.tensor([[4.0, 1.0]]), torch.tensor([[1.0, 0.0]])), torch.zeros(1, 2))
    g = discounted_returns(torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3), gamma=0.5)
    assert torch.allclose(g, torch.tensor([[0.25, 0.5, 1.0]]))


def test_reinforce_pp_token_whitens_returns_over_all_tokens():
    # returns (1, 1, 1) and (0, 0, 0): mean .5, unbiased var 6 * .25 / 5 = .3
    adv = reinforce_pp_token_advantages(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), torch.ones(2, 3))
    s = 0.5 / math.sqrt(0.3)
    assert torch.allclose(adv, torch.tensor([[s, s, s], [-s, -s, -s]]), atol=1e-5)


def test_reinforce_pp_with_kl_in_reward_charges_each_token_the_kl_after_it():
    # k1 KL = logp - ref: row 0 (.5, 0), row 1 (0, 1); coef 1; scores 1 and 0 on the last token.
    # token rewards: row 0 (-.5, 1), row 1 (0, -1); returns (gamma 1): (.5, 1), (-1, -1).
    logp = torch.zeros(2, 2)
    ref = torch.tensor([[-0.5, 0.0], [0.0, -1.0]])

    def whitened(returns):  # over all 4 tokens, unbiased std
        mean = returns.mean()
        return (returns - mean) / math.sqrt(((returns - mean) ** 2).sum().item() / 3)

    adv = reinforce_pp_kl_advantages(torch.tensor([1.0, 0.0]), logp, ref, torch.ones(2, 2), coef=1.0)
    assert torch.allclose(adv, whitened(torch.tensor([[0.5, 1.0], [-1.0, -1.0]])), atol=1e-5)
    # gamma .5: row 0 returns (-.5 + .5 * 1, 1) = (0, 1): token 0 sees its own KL and half the outcome
    adv = reinforce_pp_kl_advantages(torch.tensor([1.0, 0.0]), logp, ref, torch.ones(2, 2), coef=1.0, gamma=0.5)
    assert torch.allclose(adv, whitened(torch.tensor([[0.0, 1.0], [-0.5, -1.0]])), atol=1e-5)
    # a fully masked row (failed reward) stays 0 and is in no statistic
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    adv = reinforce_pp_kl_advantages(torch.tensor([1.0, 0.0]), logp, ref, mask, coef=1.0)
    s = 0.25 / math.sqrt(0.125)  # returns (.5, 1): mean .75, unbiased var .125
    assert torch.allclose(adv, torch.tensor([[-s, s], [0.0, 0.0]]), atol=1e-5)


def test_last_token_scores():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    out = last_token_scores(torch.tensor([2.0, 3.0, 4.0]), mask)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]]))


# -------------------------------------------------------------------------- KL
def test_low_var_kl_is_k3_capped_at_ten():
    logp = torch.tensor([0.0, 0.0], requires_grad=True)
    ref = torch.tensor([math.log(2.0), 3.0])
    kl = low_var_kl(logp, ref)
    # k3 = e^x - 1 - x with x = ref - logp: log 2 -> 1 - log 2; 3 -> e^3 - 4 = 16.09 -> 10
    assert kl[0].item() == pytest.approx(1 - math.log(2.0))
    assert kl[1].item() == 10.0
    kl.sum().backward()
    assert logp.grad[1].item() == 0.0  # no gradient past the cap
    assert kl_k3(logp.detach(), ref)[1].item() == pytest.approx(math.exp(3) - 4)


def test_kl_penalty_rewards_and_sequence_kl():
    scores = torch.tensor([[0.0, 0.0, 1.0]])
    ref = torch.zeros(1, 3)
    logp = torch.tensor([[0.9, 0.1, 0.3]])  # k1 = (.9, .1, .3); position 0 is masked
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    rewards, kl = kl_penalty_rewards(scores, logp, ref, mask, coef=0.5, estimator="k1")
    assert torch.allclose(rewards, torch.tensor([[0.0, -0.05, 0.85]]))
    assert torch.allclose(kl, torch.tensor([[0.0, 0.1, 0.3]]))
    # per-sequence sums 0.4 and 0.6 (the fully masked middle row does not count)
    kl = torch.tensor([[0.1, 0.3], [5.0, 5.0], [0.6, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert mean_sequence_kl(kl, mask) == pytest.approx(0.5)


def test_adaptive_kl_controller_by_hand_and_checkpoint():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(9.0, n_steps=1000)  # error clip(9/6 - 1) = .2: beta * (1 + .2 * .1)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(3.0, n_steps=500)  # error clip(-.5) = -.2: beta * (1 - .2 * .05)
    assert ctl.value == pytest.approx(0.102 * 0.99)
    ctl.update(6.0, n_steps=500)  # on target: unchanged
    assert ctl.value == pytest.approx(0.102 * 0.99)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(pickle.loads(pickle.dumps(ctl.state_dict())))
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, 6.0, 10_000)
    with pytest.raises(ValueError):
        ctl.update(float("nan"), n_steps=1)

    fixed = make_kl_controller(0.05, None, 10_000)
    assert isinstance(fixed, FixedKLController)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05
    assert isinstance(make_kl_controller(0.05, 6.0, 10), AdaptiveKLController)


# --------------------------------------------------------------- policy losses
def _grad(loss_fn, logp, *args, **kwargs):
    logp = logp.clone().requires_grad_()
    loss, metrics = loss_fn(logp, *args, **kwargs)
    loss.sum().backward()
    return loss.detach(), logp.grad, metrics


def test_ppo_dual_clip_by_hand():
    # ratios 5, 2, .5, 5 with A = -1, -1, -1, +1; eps .2, c = 3
    #  r=5, A<0: PPO loss max(5, .8) = 5, capped at 3 (no gradient)
    #  r=2, A<0: max(2, .8) = 2 < 3, gradient -A * r = 2
    #  r=.5, A<0: max(.5, .8) = .8 (clipped)        A>0 r=5: -1.2 (clipped)
    logp = torch.tensor([5.0, 2.0, 0.5, 5.0]).log()
    adv = torch.tensor([-1.0, -1.0, -1.0, 1.0])
    loss, grad, m = _grad(ppo_clip, logp, torch.zeros(4), adv, torch.ones(4),
                          clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=3.0)
    assert torch.allclose(loss, torch.tensor([3.0, 2.0, 0.8, -1.2]), atol=1e-5)
    assert torch.allclose(grad, torch.tensor([0.0, 2.0, 0.0, 0.0]), atol=1e-5)
    assert torch.equal(m["clip_frac"], torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert torch.equal(m["dual_clip_frac"], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    plain, _, _ = _grad(ppo_clip, logp, torch.zeros(4), adv, torch.ones(4), clip_eps_low=0.2, clip_eps_high=0.2)
    assert plain[0].item() == pytest.approx(5.0)


def test_gspo_clips_whole_sequences_on_the_mean_log_ratio():
    # row 0: log-ratios (log 2, 0) + a masked 5.0 that must not count; s = sqrt(2) > 1.2,
    #        A = +1 -> whole sequence clipped: loss -1.2, no gradient on any token
    #        (token-level PPO would still push token 2, whose own ratio is 1)
    # row 1: log-ratios (.1, -.1, 0): s = 1, A = -1: loss 1, gradient -A * s = 1
    # row 2: log-ratios (.2, 0): s = e^.1 < 1.2, A = 2: loss -2e^.1, gradient -2e^.1
    log_ratio = torch.tensor([[math.log(2.0), 0.0, 5.0], [0.1, -0.1, 0.0], [0.2, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0], [-1.0], [2.0]]).expand(3, 3)
    old = -torch.ones(3, 3)
    loss, grad, m = _grad(gspo, old + log_ratio, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2)
    e = 2 * math.exp(0.1)
    assert torch.allclose((loss * mask), torch.tensor([[-1.2, -1.2, 0.0], [1.0, 1.0, 1.0], [-e, -e, 0.0]]), atol=1e-5)
    # grad of sum(loss) (masked positions of row 0/2 carry loss but are masked by aggregation)
    assert torch.allclose(grad * mask, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [-e, -e, 0.0]]), atol=1e-5)
    assert torch.equal(m["clip_frac"] * mask, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    _, ppo_grad, _ = _grad(ppo_clip, old + log_ratio, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2)
    assert ppo_grad[0, 1].item() == pytest.approx(-1.0)


def test_cispo_keeps_a_clipped_weight_gradient():
    # ratios 1.5, .5, 1, 1.5 -> weights 1.2, .8, 1, 1.2; loss -w A logp; grad -w A
    logp = torch.tensor([-1.0, -1.0, -1.0, -0.5])
    old = logp - torch.tensor([1.5, 0.5, 1.0, 1.5]).log()
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0])
    loss, grad, m = _grad(cispo, logp, old, adv, torch.ones(4), clip_eps_low=0.2, clip_eps_high=0.2)
    assert torch.allclose(loss, torch.tensor([1.2, -0.8, 2.0, -0.6]), atol=1e-5)
    assert torch.allclose(grad, torch.tensor([-1.2, 0.8, -2.0, 1.2]), atol=1e-5)
    assert torch.equal(m["clip_frac"], torch.tensor([1.0, 1.0, 0.0, 1.0]))
    # eps_low = 1: the paper's upper-only truncation, ratio .5 keeps weight .5
    _, grad, _ = _grad(cispo, logp, old, adv, torch.ones(4), clip_eps_low=1.0, clip_eps_high=0.2)
    assert grad[1].item() == pytest.approx(0.5, abs=1e-5)


def test_clipped_value_loss_by_hand():
    # V = 1.5 moved .5 from V_old = 1 (clip .2 -> 1.2): max(.25, .64) / 2 = .32, no gradient
    # V = 1.1 within the clip: .81 / 2 = .405, gradient V - R = -.9
    values = torch.tensor([1.5, 1.1], requires_grad=True)
    loss, clipped = clipped_value_loss(values, torch.ones(2), torch.full((2,), 2.0), value_clip=0.2)
    loss.sum().backward()
    assert torch.allclose(loss, torch.tensor([0.32, 0.405]))
    assert torch.allclose(values.grad, torch.tensor([0.0, -0.9]))
    assert torch.equal(clipped, torch.tensor([1.0, 0.0]))
    plain, _ = clipped_value_loss(values.detach(), torch.ones(2), torch.full((2,), 2.0), value_clip=None)
    assert torch.allclose(plain, torch.tensor([0.125, 0.405]))


# ----------------------------------------------------------------- aggregation
def test_aggregations_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # 3 tokens, 2 sequences
    assert count_sequences(mask) == 2.0
    d = dict(global_num_tokens=3.0, global_num_seqs=2.0, norm_len=4.0)
    expected = {
        "token-mean": (1 + 2 + 4) / 3,
        "seq-mean-token-sum": ((1 + 2) + 4) / 2,
        "seq-mean-token-mean": (1.5 + 4) / 2,
        "seq-mean-token-sum-norm": (3 + 4) / (2 * 4),
    }
    assert set(expected) == set(LOSS_AGGREGATIONS)
    for mode, value in expected.items():
        agg = LOSS_AGGREGATIONS[mode]
        assert agg(values, mask, **d).item() == pytest.approx(value), mode
        # row by row, each divided by the global denominators, adds up to the whole
        parts = sum(agg(values[i : i + 1], mask[i : i + 1], **d) for i in range(3))
        assert parts.item() == pytest.approx(value), mode
    with pytest.raises(ValueError, match="global_num_seqs"):
        LOSS_AGGREGATIONS["seq-mean-token-mean"](values, mask, 3.0)
    with pytest.raises(ValueError, match="norm_len"):
        LOSS_AGGREGATIONS["seq-mean-token-sum-norm"](values, mask, 3.0, 2.0)


# ---------------------------------------------------- LossFns and batch splits
def _batch(rows=5, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rows, width, generator=g) > 0.3).float()
    mask[0] = 0.0  # a fully masked sequence contributes nothing
    mask[1, 0] = 1.0
    adv = torch.randn(rows, 1, generator=g).expand(rows, width).contiguous()
    batch = TrainBatch(
        input_ids=torch.zeros(rows, width, dtype=torch.long),
        attention_mask=torch.ones(rows, width, dtype=torch.long),
        loss_mask=mask,
        advantages=adv,
        old_logprobs=-torch.rand(rows, width, generator=g),
        ref_logprobs=-torch.rand(rows, width, generator=g),
        global_num_tokens=float(mask.sum()),
    )
    # TrainBatch.global_num_seqs is a proposed field; set it as an attribute until it lands
    batch.global_num_seqs = count_sequences(mask)
    return batch


def _part(batch, idx):
    part = batch.select(idx)
    part.global_num_seqs = batch.global_num_seqs  # a step-level scalar, like global_num_tokens
    return part


def _whole_vs_split(loss_fn, batch, base, extra):
    whole = base.clone().requires_grad_()
    loss, metrics = loss_fn(ModelOutput(whole, extra), batch)
    loss.backward()
    split = base.clone().requires_grad_()
    summed = {}
    for idx in (slice(0, 1), slice(1, 3), slice(3, 5)):
        part_loss, part_metrics = loss_fn(ModelOutput(split[idx], extra[idx]), _part(batch, idx))
        part_loss.backward()
        for k, v in part_metrics.items():
            summed[k] = summed.get(k, 0.0) + v
    return whole.grad, split.grad, metrics, summed


def test_entropy_bonus_by_hand():
    """On-policy with zero advantages the policy term is 0, so the loss is the bonus
    alone: -coef * (token-mean entropy over the step's trained tokens)."""
    batch = _batch()
    batch.advantages = torch.zeros_like(batch.advantages)
    entropy = torch.tensor([[0.5] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]] + [[2.0] * 6] * 3)
    spec = PolicyLossSpec(entropy_coef=0.1)
    loss, metrics = policy_loss_fn(spec, ModelOutput(batch.old_logprobs.clone(), entropy), batch)
    mask = batch.loss_mask
    expected = (entropy * mask).sum() / mask.sum()  # row 0 (fully masked, 0.5s) left out
    assert loss.item() == pytest.approx(-0.1 * expected.item())
    assert metrics["policy/entropy"] == pytest.approx(expected.item())
    no_bonus, _ = policy_loss_fn(PolicyLossSpec(), ModelOutput(batch.old_logprobs.clone(), entropy), batch)
    assert no_bonus.item() == 0.0


@pytest.mark.parametrize("kl", ["k1", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("agg", sorted(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("policy_loss", sorted(POLICY_LOSSES))
def test_every_policy_loss_and_aggregation_gives_the_same_gradient_split(policy_loss, agg, kl):
    spec = PolicyLossSpec(policy_loss=policy_loss, loss_agg=agg, clip_eps_low=0.1, clip_eps_high=0.15,
                          dual_clip_c=2.0 if policy_loss == "ppo_clip" else None,
                          kl_loss_coef=0.1, kl_estimator=kl, entropy_coef=0.01, norm_len=8.0)
    spec.check()
    batch = _batch()
    g = torch.Generator().manual_seed(1)
    base = (batch.old_logprobs + 0.3 * torch.randn(batch.input_ids.shape, generator=g)).detach()
    entropy = torch.rand(batch.input_ids.shape, generator=g)
    loss_fn = functools.partial(policy_loss_fn, spec)
    whole, split, metrics, summed = _whole_vs_split(loss_fn, batch, base, entropy)
    assert torch.allclose(whole, split, atol=1e-6)
    assert whole.abs().sum() > 0
    assert whole[0].abs().sum() == 0  # the fully masked row gets no gradient
    for key in metrics:
        assert summed[key] == pytest.approx(metrics[key], abs=1e-6), key


@pytest.mark.parametrize("agg", sorted(LOSS_AGGREGATIONS))
def test_value_loss_gives_the_same_gradient_split(agg):
    # TrainBatch.old_values/returns and ModelOutput.values are proposed fields; plain
    # attributes and a namespace stand in for them here.
    batch = _batch()
    g = torch.Generator().manual_seed(2)
    old_values = torch.randn(batch.input_ids.shape, generator=g)
    returns = torch.randn(batch.input_ids.shape, generator=g)
    base = (old_values + 0.3 * torch.randn(batch.input_ids.shape, generator=g)).detach()
    loss_fn = functools.partial(value_loss_fn, ValueLossSpec(loss_agg=agg, value_clip=0.2, norm_len=8.0))

    def run(idx, values):
        mb = _part(batch, idx)
        mb.old_values, mb.returns = old_values[idx], returns[idx]
        loss, metrics = loss_fn(SimpleNamespace(values=values[idx]), mb)
        loss.backward()
        return metrics

    whole = base.clone().requires_grad_()
    metrics = run(slice(0, 5), whole)
    split = base.clone().requires_grad_()
    parts = [run(idx, split) for idx in (slice(0, 2), slice(2, 3), slice(3, 5))]
    assert torch.allclose(whole.grad, split.grad, atol=1e-6)
    assert whole.grad.abs().sum() > 0 and whole.grad[0].abs().sum() == 0
    for key in metrics:
        assert sum(p[key] for p in parts) == pytest.approx(metrics[key], abs=1e-6), key


def test_grpo_loss_is_the_ppo_clip_policy_loss():
    batch = _batch()
    cfg = AlgorithmConfig(kl_coef=0.1, entropy_coef=0.01, clip_eps_high=0.28)
    logp = batch.old_logprobs + 0.2
    entropy = torch.rand(batch.input_ids.shape)
    spec = PolicyLossSpec(clip_eps_low=0.2, clip_eps_high=0.28, kl_loss_coef=0.1, entropy_coef=0.01)
    a_loss, a_metrics = grpo_loss(cfg, ModelOutput(logp, entropy), batch)
    b_loss, b_metrics = policy_loss_fn(spec, ModelOutput(logp, entropy), batch)
    assert a_loss.item() == b_loss.item() and a_metrics == b_metrics
    # on-policy, no KL/entropy terms: loss = -(sum A * mask) / N, nothing clipped
    loss, metrics = policy_loss_fn(PolicyLossSpec(), ModelOutput(batch.old_logprobs.clone(), None), batch)
    expected = -(batch.advantages * batch.loss_mask).sum() / batch.global_num_tokens
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert metrics["policy/clip_frac"] == 0.0


def _cfg(**fields):
    # The fields make_policy_loss_fn reads beyond today's AlgorithmConfig (proposed).
    cfg = AlgorithmConfig()
    new = dict(policy_loss="ppo_clip", dual_clip_c=None, loss_norm_len=0, value_clip=0.2)
    for key, value in {**new, **fields}.items():
        setattr(cfg, key, value)
    return cfg


def test_make_policy_loss_fn_pickles_and_reads_the_config():
    batch = _batch()
    batch.ref_logprobs = batch.old_logprobs - 1.0  # KL far from 0, so the term shows
    out = ModelOutput(batch.old_logprobs.clone(), None)
    fn = pickle.loads(pickle.dumps(make_policy_loss_fn(_cfg(kl_coef=0.5))))
    with_kl, _ = fn(out, batch)
    without, _ = make_policy_loss_fn(_cfg(kl_coef=0.5, kl_in_reward=True))(out, batch)
    kl = (kl_k3(batch.old_logprobs, batch.ref_logprobs) * batch.loss_mask).sum() / batch.global_num_tokens
    assert (with_kl - without).item() == pytest.approx(0.5 * kl.item(), rel=1e-5)
    # Dr.GRPO's constant defaults to the response cap; an explicit loss_norm_len wins
    norm = make_policy_loss_fn(_cfg(loss_agg="seq-mean-token-sum-norm"), max_response_len=64)
    assert norm.args[0].norm_len == 64.0
    assert make_policy_loss_fn(_cfg(loss_agg="seq-mean-token-sum-norm", loss_norm_len=32),
                               max_response_len=64).args[0].norm_len == 32.0
    with pytest.raises(ValueError, match="constant length"):
        make_policy_loss_fn(_cfg(loss_agg="seq-mean-token-sum-norm"))
    with pytest.raises(ValueError, match="dual_clip_c"):
        make_policy_loss_fn(_cfg(policy_loss="gspo", dual_clip_c=3.0))
    with pytest.raises(ValueError, match="dual_clip_c"):
        make_policy_loss_fn(_cfg(dual_clip_c=1.0))
    assert make_value_loss_fn(_cfg(value_clip=None)).args[0].value_clip is None


# ------------------------------------------------------------------------ DAPO
def test_dynamic_sampling_keeps_groups_with_different_rewards():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 3, [True] * 3, [True] * 3, [True, False, True], [True, False, False]])
    # the 5.0 is invalid so group 3 is all-equal; group 4 has one valid sample
    assert dynamic_sampling_keep(rewards, valid).tolist() == [False, True, False, False, False]
    assert dynamic_sampling_keep(torch.tensor([[1.0, 1.05]]), ALL(1, 2), atol=0.1).tolist() == [False]


def test_overlong_penalty_and_filter():
    # L_max 20, L_cache 4: free up to 16, linear to -1 at 20, -1 beyond
    pen = overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, buffer_len=4, penalty_factor=0.5)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.25, -0.5, -0.5]))
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), max_len=4, buffer_len=8)
    assert overlong_filter_mask(["stop", "length", "stop"]).tolist() == [True, False, True]


# --------------------------------------------------- truncated importance sampling
def test_truncated_is_weights_scale_each_tokens_loss_by_hand():
    # One row, prompt token then three completion tokens. On-policy for the trainer
    # (logp == old), so ppo_clip's per-token loss is -A; the rollout engine's
    # log-probs differ: ratios pi_old/pi_rollout = e^0.5, e^-0.5, e^2 -> weights
    # min(ratio, 2) = 1.6487, 0.6065, 2 (the third capped).
    old = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    rollout = torch.tensor([[0.0, -1.5, -1.5, -2.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    adv = torch.tensor([[0.0, 1.0, -2.0, 0.5]])
    batch = TrainBatch(input_ids=torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4, dtype=torch.long),
                       loss_mask=mask, advantages=adv, old_logprobs=old, rollout_logprobs=rollout,
                       global_num_tokens=3.0, global_num_seqs=1.0)
    out = ModelOutput(old.clone(), None)
    w = [math.exp(0.5), math.exp(-0.5), 2.0]
    expected = -(w[0] * 1.0 + w[1] * -2.0 + w[2] * 0.5) / 3
    loss, metrics = policy_loss_fn(PolicyLossSpec(tis_cap=2.0), out, batch)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["policy/tis_capped_frac"] == pytest.approx(1 / 3)
    assert metrics["policy/tis_ratio_mean"] == pytest.approx((math.exp(0.5) + math.exp(-0.5) + math.exp(2.0)) / 3, rel=1e-6)
    # off (the default): the plain on-policy loss -mean(A)
    plain, plain_metrics = policy_loss_fn(PolicyLossSpec(), out, batch)
    assert plain.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3, rel=1e-6)
    assert "policy/tis_ratio_mean" not in plain_metrics
    # the config key reaches the spec, and a cap below 1 is refused
    assert make_policy_loss_fn(_cfg(tis_cap=2.0)).args[0].tis_cap == 2.0
    with pytest.raises(ValueError, match="tis_cap"):
        PolicyLossSpec(tis_cap=0.5).check()
