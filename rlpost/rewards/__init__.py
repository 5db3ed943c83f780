"""Reward functions: the public API (``RewardFn``, ``load_reward_fn``, ``score_one``,
``score_batch``) and the built-in math reward. See ``rlpost.rewards.api`` for the
signature a reward function must have and how failures and timeouts are isolated."""

from rlpost.rewards.api import (
    RewardFn,
    RewardInput,
    RewardTimeout,
    call_with_deadline,
    load_reward_fn,
    score_batch,
    score_one,
    to_reward,
)
from rlpost.rewards.math import extract_answer, has_answer_format, math_reward

__all__ = [
    "RewardFn",
    "RewardInput",
    "RewardTimeout",
    "call_with_deadline",
    "extract_answer",
    "has_answer_format",
    "load_reward_fn",
    "math_reward",
    "score_batch",
    "score_one",
    "to_reward",
]
