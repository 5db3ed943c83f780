"""Skipping the separate old-log-prob pass when the update is exactly on-policy
(``rlpost.algorithms.on_policy``): the loss seam's ``old_logprobs=None``, the decision
table, and the controller over fakes running the pass exactly when it should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlpost.algorithms import make_policy_loss_fn
from rlpost.algorithms.on_policy import OldLogprobPlan, old_logprob_plan
from rlpost.config.load import load_config
from rlpost.types import ModelOutput, TrainBatch
from tests.unit.test_controller import build, make_cfg, make_samples


def _batch(old: torch.Tensor | None) -> TrainBatch:
    ids = torch.tensor([[1, 4, 5]])
    return TrainBatch(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=torch.tensor([[0.0, 1.0, 1.0]]),
                      advantages=torch.tensor([[0.0, 2.0, -1.0]]), old_logprobs=old,
                      global_num_tokens=2.0, global_num_seqs=1.0)


# By hand, ratio 1 on both trained tokens (logp -1, -0.5; A 2, -1; token-mean over 2):
# the surrogate is -mean(A) = -0.5; CISPO's loss value is -mean(A log pi) =
# -(2 * -1 + -1 * -0.5) / 2 = 0.75. Every gradient is -A_t / 2 per trained token.
@pytest.mark.parametrize("policy_loss, expected", [("ppo_clip", -0.5), ("gspo", -0.5), ("cispo", 0.75)])
def test_old_none_means_detached_current_same_loss_and_gradient(policy_loss, expected):
    algo = load_config([f"algorithm.policy_loss={policy_loss}", "algorithm.kl_coef=0"]).algorithm
    loss_fn = make_policy_loss_fn(algo, max_response_len=2)
    results = []
    for explicit in (True, False):
        logp = torch.tensor([[0.0, -1.0, -0.5]], requires_grad=True)
        old = torch.tensor([[0.0, -1.0, -0.5]]) if explicit else None
        loss, metrics = loss_fn(ModelOutput(logprobs=logp), _batch(old))
        loss.backward()
        results.append((loss.item(), logp.grad.clone(), metrics["policy/approx_kl_old"]))
    for loss, grad, kl_old in results:
        assert loss == pytest.approx(expected)
        assert torch.allclose(grad, torch.tensor([[0.0, -1.0, 0.5]]))
        assert kl_old == 0.0


@pytest.mark.parametrize("overrides, separate", [
    ([], False),
    # Overlapped schedules: the pass would run on the weights the training forward runs
    # on; the older sampler's log-probs are rollout_logprobs, which the corrections use.
    (["trainer.mode=one_step_off"], False),
    (["trainer.mode=async"], False),
    (["trainer.mode=async", "algorithm.off_policy.correction=token_mask"], False),
    (["trainer.mode=async", "trainer.mini_batches=2"], True),
    (["trainer.mini_batches=2"], True),
    (["trainer.epochs=2"], True),
    (["algorithm.tis_cap=2"], False),
    (["algorithm.off_policy.correction=seq_mask"], False),
    (["algorithm.kl_in_reward=true", "algorithm.kl_coef=0.01"], True),
    (["algorithm.kl_in_reward=true", "algorithm.kl_coef=0"], False),  # no reference, nothing shaped
    (["algorithm.kl_coef=0.01"], False),  # KL as a loss term needs the reference, not old log-probs
    (["+recipe=ppo_math"], True),
    (["+recipe=reinforce_pp_math"], True),
    (["+recipe=dapo_math"], False),
])
def test_plan_keeps_the_pass_exactly_where_it_is_needed(overrides, separate):
    cfg = load_config(overrides)  # the base algorithm has kl_coef 0; the KL recipes 0.001
    assert old_logprob_plan(cfg.algorithm, cfg.trainer).separate_pass is separate


def test_ppo_without_kl_in_reward_keeps_the_pass():
    cfg = load_config(["+recipe=ppo_math", "algorithm.kl_in_reward=false", "algorithm.kl_coef=0"])
    assert old_logprob_plan(cfg.algorithm, cfg.trainer).separate_pass


class CountingTrainer:
    """Counts the trainer group's separate forward passes."""

    def __init__(self, group):
        self.group, self.passes = group, 0

    def forward_logprobs(self, batch, reference=False):
        self.passes += not reference
        return self.group.forward_logprobs(batch, reference)

    def __getattr__(self, name):
        return getattr(self.group, name)


def _controller(tmp_path: Path, *overrides: str):
    cfg = make_cfg(tmp_path, "eval.every=0", "trainer.save_every=0", *overrides)
    controller = build(cfg, make_samples())
    controller.trainer = CountingTrainer(controller.trainer)
    return controller


@pytest.mark.parametrize("overrides, passes", [
    (["trainer.mini_batches=1"], 0),
    (["trainer.mini_batches=2"], 2),
    (["trainer.mini_batches=1", "trainer.epochs=2"], 2),
    (["trainer.mini_batches=1", "algorithm.tis_cap=2"], 0),
    (["trainer.mini_batches=1", "algorithm.kl_in_reward=true", "algorithm.kl_coef=0.01"], 2),
])
def test_controller_runs_the_pass_only_when_needed(tmp_path, overrides, passes):
    controller = _controller(tmp_path, *overrides)
    metrics = [controller.step(1), controller.step(2)]
    assert controller.trainer.passes == passes
    for m in metrics:
        assert m["perf/old_logprob_pass"] == float(passes > 0)
        assert "rollout/logprob_abs_diff_mean" in m and "rollout/logprob_abs_diff_max" in m


def test_reused_log_probs_train_like_the_separate_pass(tmp_path):
    """Same seed, one controller forced to run the pass: same metrics and weights
    after two steps (ratio 1 either way; the fake's forward is deterministic)."""
    reused = _controller(tmp_path / "reused", "trainer.mini_batches=1")
    forced = _controller(tmp_path / "forced", "trainer.mini_batches=1")
    forced.old_logprobs = OldLogprobPlan(True, "forced by the test")
    for step in (1, 2):
        a, b = reused.step(step), forced.step(step)
        for key in ("policy/pg_loss", "policy/grad_norm", "rollout/logprob_abs_diff_mean",
                    "rollout/logprob_abs_diff_max", "reward/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert (reused.trainer.passes, forced.trainer.passes) == (0, 2)
    assert torch.allclose(reused.trainer.engine.model.table.weight, forced.trainer.engine.model.table.weight)
