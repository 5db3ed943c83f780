"""Code with unit-test rewards, run in the sandbox service (``rlpost.sandbox``).

The model writes a Python solution (a ```python block, or the whole reply); the
environment runs it followed by the task's tests (``assert`` lines) in the sandbox.
All tests pass: ``accuracy`` 1, episode over. Otherwise the model sees the failure
(the assertion or traceback, last lines) and may fix its code, until
``rollout.max_turns``. A sandbox outage (``SandboxError``) fails the episode; it is
retried or dropped, never scored as wrong code. Tasks: ``make_rows`` (a few built-in
problems, ``data.source=generator``) or any dataset with a ``tests`` column holding
newline-separated asserts.
"""

from __future__ import annotations

import re

from rlpost.envs import Message, StepResult, Task

PROBLEMS = [
    ("Write a function add(a, b) that returns a + b.", "assert add(2, 3) == 5\nassert add(-1, 1) == 0"),
    ("Write a function is_even(n) that returns True when n is even.", "assert is_even(4)\nassert not is_even(7)"),
    ("Write a function reverse(s) that returns the string s reversed.", "assert reverse('abc') == 'cba'\nassert reverse('') == ''"),
    ("Write a function maximum(xs) that returns the largest number in the list xs.",
     "assert maximum([3, 9, 2]) == 9\nassert maximum([-5]) == -5"),
    ("Write a function count_vowels(s) that counts the vowels (aeiou) in s.",
     "assert count_vowels('banana') == 3\nassert count_vowels('xyz') == 0"),
    ("Write a function factorial(n) that returns n!.", "assert factorial(0) == 1\nassert factorial(5) == 120"),
    ("Write a function fizz(n) that returns 'Fizz' if n is divisible by 3, else str(n).",
     "assert fizz(9) == 'Fizz'\nassert fizz(4) == '4'"),
    ("Write a function square_all(xs) that returns the squares of xs in a list.",
     "assert square_all([1, 2, 3]) == [1, 4, 9]\nassert square_all([]) == []"),
]

_BLOCK = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)


def make_rows(split: str, size: int, seed: int) -> list[dict]:
    """The built-in problems, cycled to ``size`` rows (the same for train and val:
    this set is for trying the environment, not for measuring generalisation)."""
    return [{"prompt": PROBLEMS[i % len(PROBLEMS)][0] + " Reply with a ```python code block.",
             "answer": "tests", "tests": PROBLEMS[i % len(PROBLEMS)][1]} for i in range(size)]


def extract_code(text: str) -> str:
    blocks = _BLOCK.findall(text)
    return blocks[-1] if blocks else text


class CodeEnv:
    def __init__(self, sandbox_url: str | list[str] | None = None, client=None, timeout_s: float = 5.0, memory_mb: int = 256):
        if client is None:
            from rlpost.errors import ConfigError
            from rlpost.sandbox.client import shared_client

            if not sandbox_url:
                raise ConfigError("CodeEnv needs env.kwargs.sandbox_url (start one: python -m rlpost.sandbox serve)")
            client = shared_client(sandbox_url)  # one URL or a list of them
        self.client, self.timeout_s, self.memory_mb = client, timeout_s, memory_mb
        self.task: Task | None = None

    def reset(self, task: Task) -> list[Message]:
        self.task = task
        return list(task.messages) or [{"role": "user", "content": task.question}]

    def step(self, action: str) -> StepResult:
        program = extract_code(action) + "\n\n" + str(self.task.metadata["tests"]) + "\n"
        result = self.client.run(program, "", self.timeout_s, self.memory_mb)  # SandboxError propagates
        if result.status == "ok" and result.exit_code == 0:
            return StepResult([], {"accuracy": 1.0}, True)
        tail = "\n".join((result.stderr or result.stdout or f"status {result.status}").strip().splitlines()[-6:])
        return StepResult([{"role": "user", "content": f"The tests failed:\n{tail}\nFix the code."}],
                          {"accuracy": 0.0}, False)
