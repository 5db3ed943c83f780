"""Held-out evaluation: greedy pass@1, plus mean@k / pass@k when ``eval.n > 1``."""

from __future__ import annotations

from rlpost.config.schema import EvalConfig
from rlpost.types import PromptSample, Reward, SamplingParams


def score_of(reward: Reward) -> float:
    """Correctness of one sample: the ``accuracy`` component when the reward function
    reports one (so format bonuses do not count as correct), else the total."""
    if reward.error is not None:
        return 0.0
    return reward.components.get("accuracy", reward.total)


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
        metrics[f"eval/mean@{cfg.n}"] = sum(flat) / len(flat)
        metrics[f"eval/pass@{cfg.n}"] = sum(max(p) > 0 for p in per_prompt) / len(per_prompt)
    return metrics
