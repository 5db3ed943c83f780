"""Guess the number: a small text game over several turns.

The environment picks a secret number in 1..``high`` (the task's answer); the model
guesses with ``\\boxed{n}`` and hears "Higher." or "Lower." until it finds it or
``rollout.max_turns`` runs out. ``accuracy`` is 1 when found; ``efficiency`` adds
``bonus * (1 - wasted guesses / (max_guesses - 1))`` on a find, so binary search scores
more than a scan. Tasks come from ``make_rows`` (``data.source=generator``).
"""

from __future__ import annotations

import random
import re

from rlpost.envs import Message, StepResult, Task


def make_rows(split: str, size: int, seed: int, high: int = 20) -> list[dict]:
    rng = random.Random(f"rlpost-guess/{split}/{seed}")
    return [{"prompt": f"I am thinking of a number from 1 to {high}. Guess it. After each guess I say "
                       "Higher or Lower. Answer with \\boxed{your guess}.",
             "answer": str(rng.randint(1, high)), "high": high} for _ in range(size)]


def parse_guess(text: str) -> int | None:
    from rlpost.data.dataset import last_boxed

    boxed = last_boxed(text)
    found = re.findall(r"-?\d+", boxed if boxed is not None else text)
    return int(found[-1]) if found else None


class GuessEnv:
    def __init__(self, max_guesses: int = 5, bonus: float = 0.0):
        self.max_guesses, self.bonus = max_guesses, bonus
        self.task: Task | None = None
        self.guesses = 0

    def reset(self, task: Task) -> list[Message]:
        self.task, self.guesses = task, 0
        return list(task.messages) or [{"role": "user", "content": task.question}]

    def step(self, action: str) -> StepResult:
        secret = int(self.task.answer)
        guess = parse_guess(action)
        self.guesses += 1
        out_of_guesses = self.guesses >= self.max_guesses
        if guess is None:
            return StepResult([] if out_of_guesses else [{"role": "user", "content": "Answer with \\boxed{a number}."}],
                              {"accuracy": 0.0}, out_of_guesses)
        if guess == secret:
            wasted = (self.guesses - 1) / max(self.max_guesses - 1, 1)
            reward = {"accuracy": 1.0}
            if self.bonus:
                reward["efficiency"] = self.bonus * (1.0 - wasted)
            return StepResult([], reward, True)
        hint = "Higher." if secret > guess else "Lower."
        return StepResult([] if out_of_guesses else [{"role": "user", "content": hint}], {"accuracy": 0.0},
                          out_of_guesses)
