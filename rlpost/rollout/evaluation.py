"""Held-out evaluation: greedy pass@1, plus mean@n and unbiased pass@k when ``eval.n > 1``.

pass@k is the probability that at least one of k samples is correct. Estimating it as
"any of the n samples was correct" is biased for k < n (and says nothing about k < n);
the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
Code", eq. 1) draws on all n samples of a prompt with c correct:
``pass@k = 1 - C(n - c, k) / C(n, k)``, averaged over prompts.
"""

from __future__ import annotations

from rlpost.config.schema import EvalConfig
from rlpost.types import PromptSample, Reward, SamplingParams


def score_of(reward: Reward) -> float:
    """Correctness of one sample: the ``accuracy`` component when the reward function
    reports one (so format bonuses do not count as correct), else the total."""
    if reward.error is not None:
        return 0.0
    return reward.components.get("accuracy", reward.total)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct among ``n`` samples (k <= n).

    ``1 - C(n-c, k) / C(n, k)`` as the product ``prod_{i=n-c+1}^{n} (1 - k/i)``, which
    avoids huge binomials; with fewer than k wrong samples some correct one is always drawn.
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def sampled_metrics(per_prompt: list[list[float]], n: int, ks: tuple[int, ...]) -> dict[str, float]:
    """``eval/mean@n`` and ``eval/pass@k`` for each k from the scores of each prompt's
    samples (a score > 0 counts as correct). A prompt with fewer than k scored samples
    (failed episodes are left out) does not enter pass@k."""
    flat = [x for p in per_prompt for x in p]
    metrics = {f"eval/mean@{n}": sum(flat) / max(len(flat), 1)}
    for k in ks:
        usable = [p for p in per_prompt if len(p) >= k]
        metrics[f"eval/pass@{k}"] = (sum(pass_at_k(len(p), sum(x > 0 for x in p), k) for p in usable)
                                     / max(len(usable), 1))
    return metrics


def evaluate(rollout, rewards, samples: list[PromptSample], cfg: EvalConfig, seed: int) -> dict[str, float]:
    """Metrics under ``eval/``. ``rollout``/``rewards`` are a RolloutGroup and a RewardPool
    (or anything with the same ``generate``/``score`` methods)."""
    samples = samples[: cfg.size]
    prompts = [list(s.prompt_ids) for s in samples]
    greedy = rollout.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens))
    scored = rewards.score([(s.question, g[0].text, s.answer, s.metadata) for s, g in zip(samples, greedy)])
    correct = [score_of(r) for r in scored]
    metrics = {
        "eval/accuracy": sum(correct) / len(correct),
        "eval/reward_mean": sum(r.total for r in scored) / len(scored),
        "eval/response_length": sum(len(g[0].token_ids) for g in greedy) / len(greedy),
        "eval/num_prompts": float(len(samples)),
    }
    if cfg.n > 1:
        params = SamplingParams(n=cfg.n, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seed)
        groups = rollout.generate(prompts, params)
        items = [(s.question, c.text, s.answer, s.metadata) for s, g in zip(samples, groups) for c in g]
        flat = [score_of(r) for r in rewards.score(items)]
        per_prompt = [flat[i * cfg.n : (i + 1) * cfg.n] for i in range(len(samples))]
        metrics.update(sampled_metrics(per_prompt, cfg.n, cfg.pass_ks))
    return metrics
