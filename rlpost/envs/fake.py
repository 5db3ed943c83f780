"""``FakeEnv``: an environment with no model, tools or sandbox, shipped for tests and
for trying the multi-turn loop. It also fails on request, so tests can watch a crash
or a hang fail one episode and leave the others alone.

Episode: ``turns`` model turns. After turn k < turns it answers ``"turn k: say
<answer>"`` (as a ``observation_role`` message); the last turn scores 1.0 when the model's text contains the task's answer.
Failures are asked for per task through ``task.metadata["fake_fail"]``:
``"reset"`` / ``"step"`` raise, ``"hang"`` sleeps in ``step`` far past any timeout,
``"once"`` raises in ``step`` on the first attempt at this task in this process only,
``"die"`` ends the whole process in ``step`` (``os._exit``: only for Ray env actors).
"""

from __future__ import annotations

import asyncio
import os
import time

from rlpost.envs.base import Message, StepResult, Task

_attempts: dict[str, int] = {}  # task uid -> episodes started, for "once"


class FakeEnv:
    def __init__(self, turns: int = 2, hang_s: float = 3600.0, sync: bool = False, observation_role: str = "user"):
        self.turns, self.hang_s, self.sync, self.role = turns, hang_s, sync, observation_role
        self.task: Task | None = None
        self.turn = 0
        self.attempt = 0

    async def reset(self, task: Task) -> list[Message]:
        self.task, self.turn = task, 0
        self.attempt = _attempts[task.uid] = _attempts.get(task.uid, 0) + 1
        if task.metadata.get("fake_fail") == "reset":
            raise RuntimeError("FakeEnv asked to fail in reset")
        return list(task.messages) or [{"role": "user", "content": task.question}]

    async def step(self, action: str) -> StepResult:
        fail = self.task.metadata.get("fake_fail")
        if fail == "step" or (fail == "once" and self.attempt == 1):
            raise RuntimeError("FakeEnv asked to fail in step")
        if fail == "die":
            os._exit(1)
        if fail == "hang":
            if self.sync:
                time.sleep(self.hang_s)  # blocks its worker thread, not the loop
            else:
                await asyncio.sleep(self.hang_s)
        self.turn += 1
        if self.turn < self.turns:
            return StepResult([{"role": self.role, "content": f"turn {self.turn}: say {self.task.answer}"}], 0.0, False)
        return StepResult([], float(self.task.answer in action), True)


class SyncFakeEnv(FakeEnv):
    """``FakeEnv`` with plain ``def`` methods (run in worker threads by the runner)."""

    def __init__(self, turns: int = 2, hang_s: float = 3600.0, observation_role: str = "user"):
        super().__init__(turns, hang_s, sync=True, observation_role=observation_role)

    def reset(self, task: Task) -> list[Message]:  # type: ignore[override]
        return asyncio.run(FakeEnv.reset(self, task))

    def step(self, action: str) -> StepResult:  # type: ignore[override]
        return asyncio.run(FakeEnv.step(self, action))
