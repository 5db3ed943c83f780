"""Fix a failing unit test with shell commands: a tiny SWE-style environment.

Each task is a small repository (a module with one bug and a ``unittest`` file that
fails because of it), uploaded into a fresh sandbox session at reset. The model has one
tool, ``terminal`` (``rlpost.tools.TerminalTool``): each call runs a bash command in
the session, whose files persist for the episode, so ``cat``, ``sed -i``, a heredoc or
``python3 -m unittest`` all work as in a real checkout.

Reward (``accuracy`` 1/0) is the test result, run in the same session: after every turn
with tool calls (a solved task ends the episode) and at the turn without one (the
model's final answer). The check first restores the original test file (so deleting or
editing the test does not pass it) and imports ``unittest`` before the workspace is on
the path (so a ``unittest.py`` in the workspace cannot fake it); the code under test
still runs in the checking process, so a determined policy could fake a pass from
inside the module: for real training, keep the check's verdict out of reach (e.g. run
it in a second session with only the module copied over).

The session is deleted when the episode ends (``close``); if the env actor dies, the
server reaps it after ``--session-idle-s``. A sandbox outage (``SandboxError``) fails
the episode, which is retried or dropped, never scored as a wrong fix.

Tasks: ``make_rows`` (``data.source=generator``, ``data.generator=
environments/fix_test.py:make_rows``), a ``variant`` column picking one of ``REPOS``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from rlpost.envs import Message, StepResult, Task, run_tool_calls


@dataclass(frozen=True)
class Repo:
    module: str  # the file with the bug
    source: str
    test_module: str
    test: str
    tests: int  # how many test methods the check must see run


def _repo(name: str, source: str, test_body: str, tests: int) -> Repo:
    test = f"import unittest\n\nfrom {name} import *\n\n\nclass Test(unittest.TestCase):\n{test_body}"
    return Repo(f"{name}.py", source, f"test_{name}", test, tests)


REPOS = [
    _repo("arith", "def add(a, b):\n    return a - b\n",
          "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n"
          "    def test_zero(self):\n        self.assertEqual(add(-1, 1), 0)\n", 2),
    _repo("parity", "def is_even(n):\n    return n % 2 == 1\n",
          "    def test_even(self):\n        self.assertTrue(is_even(4))\n\n"
          "    def test_odd(self):\n        self.assertFalse(is_even(7))\n", 2),
    _repo("text", "def reverse(s):\n    return s[::1]\n",
          "    def test_reverse(self):\n        self.assertEqual(reverse('abc'), 'cba')\n", 1),
    _repo("stats", "def maximum(xs):\n    best = xs[0]\n    for x in xs:\n        if x < best:\n"
                   "            best = x\n    return best\n",
          "    def test_max(self):\n        self.assertEqual(maximum([3, 9, 2]), 9)\n\n"
          "    def test_single(self):\n        self.assertEqual(maximum([-5]), -5)\n", 2),
    _repo("fact", "def factorial(n):\n    out = 1\n    for k in range(1, n):\n        out *= k\n    return out\n",
          "    def test_small(self):\n        self.assertEqual(factorial(0), 1)\n\n"
          "    def test_five(self):\n        self.assertEqual(factorial(5), 120)\n", 2),
]

PROMPT = ("The repository in your working directory has a failing unit test: `python3 -m unittest` shows it. "
          "Fix the bug in the code (not the test) using the terminal tool, then reply DONE.")


def make_rows(split: str, size: int, seed: int) -> list[dict]:
    """The built-in repositories, cycled to ``size`` rows (the same for train and val:
    this set exercises the plumbing, it does not measure generalisation)."""
    return [{"prompt": PROMPT, "answer": "tests", "variant": i % len(REPOS)} for i in range(size)]


def check_program(repo: Repo) -> str:
    """Python, run in the session: restore the test file, run it, print PASS or FAIL."""
    return (
        "import sys\n"
        "sys.path.remove('/sandbox')  # stdlib first: a unittest.py in the workspace must not answer\n"
        "import io, unittest\n"
        f"open({repo.test_module + '.py'!r}, 'w').write({repo.test!r})\n"
        "sys.path.append('/sandbox')\n"
        "stream = io.StringIO()\n"
        "try:\n"
        f"    suite = unittest.defaultTestLoader.loadTestsFromName({repo.test_module!r})\n"
        "    result = unittest.TextTestRunner(stream=stream, verbosity=0).run(suite)\n"
        f"    passed = result.wasSuccessful() and result.testsRun == {repo.tests}\n"
        "except Exception as e:\n"
        "    passed = False\n"
        "    stream.write(repr(e))\n"
        "print('PASS' if passed else 'FAIL')\n"
        "print(stream.getvalue()[-2000:], file=sys.stderr)\n"
    )


class FixTestEnv:
    def __init__(self, sandbox_url: str | list[str] | None = None, client=None, command_timeout_s: float = 10.0,
                 memory_mb: int = 256, check_timeout_s: float = 10.0):
        if client is None:
            from rlpost.errors import ConfigError
            from rlpost.sandbox.client import shared_client

            if not sandbox_url:
                raise ConfigError("FixTestEnv needs env.kwargs.sandbox_url (start one: python -m rlpost.sandbox serve)")
            client = shared_client(sandbox_url)  # one URL or a list of them; a session sticks to one
        self.client, self.command_timeout_s, self.memory_mb = client, command_timeout_s, memory_mb
        self.check_timeout_s = check_timeout_s
        self.session = None
        self.tools: list = []
        self.repo: Repo | None = None

    def reset(self, task: Task) -> list[Message]:
        from rlpost.tools import TerminalTool

        self.repo = REPOS[int(task.metadata.get("variant", 0)) % len(REPOS)]
        files = {self.repo.module: self.repo.source, self.repo.test_module + ".py": self.repo.test}
        self.session = self.client.open_session(files)  # SandboxError propagates: the episode fails
        self.tools = [TerminalTool(self.session, self.command_timeout_s, self.memory_mb)]
        return list(task.messages) or [{"role": "user", "content": task.question}]

    def step(self, action: str) -> StepResult:
        tool_messages = run_tool_calls(action, self.tools)
        passed = self._tests_pass()
        if tool_messages is not None and not passed:
            return StepResult(tool_messages, {"accuracy": 0.0}, False, {"tool_calls": len(tool_messages)})
        return StepResult([], {"accuracy": float(passed)}, True)

    def _tests_pass(self) -> bool:
        result = self.session.run(check_program(self.repo), timeout_s=self.check_timeout_s, memory_mb=self.memory_mb)
        return result.status == "ok" and result.stdout.strip().endswith("PASS")

    def close(self) -> None:
        # Called on the env actor's event loop: the DELETE goes out on a thread of its own,
        # so a slow or dead server cannot stall the other episodes (the server reaps what
        # it never receives).
        if self.session is not None:
            threading.Thread(target=self.session.close, daemon=True, name="rlpost-session-close").start()
            self.session = None
