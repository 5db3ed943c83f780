"""Countdown: reach a target number with the given numbers (each used at most once)
and + - * / and parentheses, with feedback over several turns.

The model answers with an expression in ``\\boxed{}``. A correct one (its value is the
target, it uses only the given numbers, each at most once) ends the episode with
``accuracy`` 1. Otherwise the environment says what was wrong ("3 + 5 = 8, not 22",
"7 is used twice") and the model tries again, until ``rollout.max_turns``.
Tasks come from ``make_rows`` (``data.source=generator``): 3 or 4 numbers from 1..9
and a target that some expression over 2 or 3 of them reaches.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter

from rlpost.envs import Message, StepResult, Task

_OPS = ("+", "-", "*")


def make_rows(split: str, size: int, seed: int) -> list[dict]:
    """``size`` puzzles; train and val come from different random streams and no
    (numbers, target) pair of val appears in train."""
    rng = random.Random(f"rlpost-countdown/{split}/{seed}")
    held_out = lambda nums, target: hash_bucket(nums, target) == 0  # noqa: E731
    rows, seen = [], set()
    while len(rows) < size:
        count = rng.choice((3, 4))
        numbers = [rng.randint(1, 9) for _ in range(count)]
        used = rng.sample(numbers, rng.choice((2, 3)))
        expr = str(used[0])
        for n in used[1:]:
            expr = f"({expr} {rng.choice(_OPS)} {n})" if rng.random() < 0.5 else f"{expr} {rng.choice(_OPS)} {n}"
        target = evaluate(expr)
        if target is None or target < 1 or target != int(target):
            continue
        key = (tuple(numbers), int(target))
        if key in seen or held_out(numbers, int(target)) != (split == "val"):
            continue
        seen.add(key)
        nums = ", ".join(map(str, numbers))
        rows.append({"prompt": f"Use the numbers {nums} to make {int(target)}. Use each number at most once, "
                               "with + - * / and parentheses. Put the expression in \\boxed{}.",
                     "answer": str(int(target)), "numbers": " ".join(map(str, numbers))})
    return rows


def hash_bucket(numbers, target) -> int:
    import hashlib

    return hashlib.sha256(f"{sorted(numbers)}:{target}".encode()).digest()[0] % 8


def evaluate(expression: str) -> float | None:
    """Value of an arithmetic expression over integers and + - * / (), or None."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return None

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            return a / b
        raise ValueError("not allowed")

    try:
        return walk(tree)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def check(expression: str, numbers: list[int], target: int) -> tuple[bool, str]:
    """(correct, feedback for the model)."""
    used = Counter(int(n) for n in re.findall(r"\d+", expression))
    extra = used - Counter(numbers)
    if extra:
        return False, f"{', '.join(map(str, sorted(extra)))} is not among the numbers you may use (or used too often)."
    value = evaluate(expression)
    if value is None:
        return False, f"{expression} is not a valid expression with + - * / and parentheses."
    if abs(value - target) > 1e-9:
        shown = int(value) if value == int(value) else round(value, 4)
        return False, f"{expression} = {shown}, not {target}. Try again."
    return True, "Correct."


def last_boxed(text: str) -> str | None:
    from rlpost.data.dataset import last_boxed as boxed

    return boxed(text)


class CountdownEnv:
    def __init__(self):
        self.task: Task | None = None

    def reset(self, task: Task) -> list[Message]:
        self.task = task
        return list(task.messages) or [{"role": "user", "content": task.question}]

    def step(self, action: str) -> StepResult:
        numbers = [int(n) for n in str(self.task.metadata["numbers"]).split()]
        target = int(self.task.answer)
        expression = last_boxed(action)
        if not expression:
            return StepResult([{"role": "user", "content": "Put your expression in \\boxed{}."}],
                              {"accuracy": 0.0}, False)
        correct, feedback = check(expression, numbers, target)
        if correct:
            return StepResult([], {"accuracy": 1.0}, True)
        return StepResult([{"role": "user", "content": feedback}], {"accuracy": 0.0}, False)
