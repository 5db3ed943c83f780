"""pass@k: the unbiased estimator by hand and against counting, and the eval paths that
report it (single-turn through the controller's groups, multi-turn through episodes)."""

from __future__ import annotations

import itertools
from math import comb

import pytest

from rlpost.config.load import load_config
from rlpost.config.schema import EvalConfig
from rlpost.errors import ConfigError
from rlpost.engines.fake import FakeRolloutEngine
from rlpost.envs.runner import LocalEnvPool
from rlpost.rollout.evaluation import evaluate, pass_at_k, sampled_metrics
from rlpost.local import LocalRewardPool, LocalRolloutGroup
from rlpost.rollout.multiturn import EpisodeCollector
from rlpost.types import PromptSample


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 2, 1 - 3 / 10),      # 1 - C(3,2)/C(5,2)
    (4, 1, 1, 1 / 4),           # pass@1 is the share correct
    (4, 0, 2, 0.0),
    (4, 3, 2, 1.0),             # fewer than k wrong: some correct one is always drawn
    (10, 3, 5, 1 - 21 / 252),   # 1 - C(7,5)/C(10,5)
    (4, 1, 4, 1.0),             # k = n: "any correct"
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                assert len(subsets) == comb(n, k)
                share = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(share, abs=1e-12), (n, c, k)


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


def test_sampled_metrics_by_hand():
    per_prompt = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]
    m = sampled_metrics(per_prompt, 4, (1, 2, 4))
    assert m["eval/mean@4"] == pytest.approx(3 / 12)
    assert m["eval/pass@1"] == pytest.approx((1 / 4 + 0 + 2 / 4) / 3)
    assert m["eval/pass@2"] == pytest.approx(((1 - 3 / 6) + 0 + (1 - 1 / 6)) / 3)
    assert m["eval/pass@4"] == pytest.approx(2 / 3)
    # A prompt with fewer scored samples than k (failed episodes) stays out of pass@k only.
    m = sampled_metrics([[1, 0, 0, 0], [1]], 4, (1, 4))
    assert m["eval/pass@4"] == 1.0 and m["eval/pass@1"] == pytest.approx((1 / 4 + 1) / 2)


def test_eval_k_is_validated():
    assert EvalConfig(n=4).pass_ks == (4,) and EvalConfig().pass_ks == ()
    assert EvalConfig(n=8, k=[4, 1, 4]).pass_ks == (1, 4)
    with pytest.raises(ConfigError, match="eval.k"):
        load_config(["eval.n=4", "eval.k=[1,8]"])
    with pytest.raises(ConfigError, match="eval.n > 1"):
        load_config(["eval.k=[1]"])


def _reward(prompt, completion, ground_truth, metadata):
    return float(completion.startswith(ground_truth))


def test_single_turn_eval_reports_pass_at_k_from_its_samples():
    cfg = load_config(["eval.n=6", "eval.k=[1,3,6]", "eval.size=8", f"reward.fn='{__file__}:_reward'"])
    letters = lambda ids: "".join(chr(ord("a") + t) for t in ids)  # noqa: E731
    rollout = LocalRolloutGroup([FakeRolloutEngine(vocab_size=6, eos_id=2, seed=5, decode=letters,
                                                   length_fraction=0.5)])
    samples = [PromptSample(uid=f"p{i}", prompt_ids=(1, i), question="q", answer="abdef"[i % 5], metadata={})
               for i in range(8)]
    m = evaluate(rollout, LocalRewardPool(cfg.reward), samples, cfg.eval, seed=1)
    # Scores are 0/1, so pass@1 is mean@n, and pass@k never falls as k grows.
    assert m["eval/pass@1"] == pytest.approx(m["eval/mean@6"])
    assert m["eval/pass@1"] <= m["eval/pass@3"] <= m["eval/pass@6"]
    assert 0 < m["eval/mean@6"] < 1  # the fake samples both right and wrong first letters


def test_multi_turn_eval_samples_n_episodes_and_leaves_failed_ones_out(tmp_path):
    from rlpost.models.loading import load_tokenizer, resolve_model_path

    cfg = load_config(["rollout.max_turns=2", "env.fn=rlpost.envs.fake:FakeEnv", "env.max_retries=0",
                       f"output_dir={tmp_path}"])
    tokenizer = load_tokenizer(resolve_model_path("builtin:tiny-math"))
    envs = LocalEnvPool("rlpost.envs.fake:FakeEnv", {"turns": 1}, timeout_s=5)
    rollout = LocalRolloutGroup([FakeRolloutEngine(eos_id=tokenizer.eos_token_id, length_fraction=0.0)])
    collector = EpisodeCollector(cfg, rollout, envs, tokenizer)
    samples = [PromptSample(uid="good", prompt_ids=(1,), question="q", answer="", metadata={}),
               PromptSample(uid="bad", prompt_ids=(1,), question="q", answer="7", metadata={"fake_fail": "step"})]
    m = collector.evaluate(samples, EvalConfig(n=3, k=[1, 3], size=2), 0, seed=1)
    envs.shutdown()
    # "good": the empty answer is in every action, so all 3 samples score 1; "bad" fails
    # every episode and is left out of mean and pass@k instead of counting as wrong.
    assert m["eval/mean@3"] == 1.0 and m["eval/pass@1"] == 1.0 and m["eval/pass@3"] == 1.0
    assert m["eval/episodes_failed"] == 1.0  # the greedy pass: one of two tasks failed
