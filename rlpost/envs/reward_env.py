"""The single-turn adapter: any reward function is an environment.

``reset`` opens with the dataset's conversation; ``step`` scores the model's answer
with the reward function (``rlpost.rewards.api.score_one``: its timeout and per-sample
isolation apply) and ends the episode. A reward function that fails marks the
episode's reward as failed (``info["reward_error"]``), exactly as on the single-turn path.
"""

from __future__ import annotations

from rlpost.envs.base import Message, StepResult, Task


class RewardEnv:
    def __init__(self, fn: str = "rlpost.rewards.math:math_reward", kwargs: dict | None = None,
                 timeout_s: float = 10.0):
        from rlpost.rewards.api import load_reward_fn

        self.fn = load_reward_fn(fn, kwargs=kwargs or {})
        self.kwargs, self.timeout_s = dict(kwargs or {}), timeout_s
        self.task: Task | None = None

    def reset(self, task: Task) -> list[Message]:
        self.task = task
        return list(task.messages) or [{"role": "user", "content": task.question}]

    def step(self, action: str) -> StepResult:
        from rlpost.rewards.api import score_one

        t = self.task
        reward = score_one(self.fn, t.question, action, t.answer, t.metadata, self.timeout_s, **self.kwargs)
        info = {"reward_error": reward.error} if reward.error else {}
        return StepResult([], reward.components or reward.total, True, info)
