"""In-flight weight updates: a rollout engine's decoding steps and its weight loads
take turns, so a load lands between two steps of a ``generate`` that is running.

Contract of ``DecodeGate``:
- ``step()`` (the generating thread, around one forward + sample) waits while a load
  runs or is waiting; ``load()`` (the weight-sync thread, around ``update_weights``)
  waits for the step in progress to finish. Loads go first: a load that is waiting
  holds back the next step, so a generate that never pauses cannot starve it (a
  plain lock would: the generating thread re-takes it before the waiter wakes).
- ``steps`` counts the decoding steps taken in all (every generate call);
  ``wait_steps(n)`` waits until there were at least ``n``.
- ``pause_after(n)``: steps past the ``n``-th wait until the next load has finished,
  which places an update at a known token (tests; reproducing a run's switch point).

The gate knows nothing of models or versions; engines record which version sampled
each token (``Completion.token_versions``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

INFLIGHT_KV = ("keep", "recompute")


class DecodeGate:
    def __init__(self):
        self._cond = threading.Condition()
        self._stepping = self._loading = False
        self._loads_waiting = 0
        self._loads_done = 0
        self._pause: tuple[int, int] | None = None  # (after this many steps, until loads_done exceeds this)
        self.steps = 0

    def _may_step(self) -> bool:
        if self._loading or self._loads_waiting:
            return False
        pause = self._pause
        return pause is None or self.steps < pause[0] or self._loads_done > pause[1]

    @contextmanager
    def step(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(self._may_step)
            self._stepping = True
        try:
            yield
        finally:
            with self._cond:
                self._stepping = False
                self.steps += 1
                self._cond.notify_all()

    @contextmanager
    def load(self) -> Iterator[None]:
        with self._cond:
            self._loads_waiting += 1
            self._cond.wait_for(lambda: not self._stepping and not self._loading)
            self._loads_waiting -= 1
            self._loading = True
        try:
            yield
        finally:
            with self._cond:
                self._loading = False
                self._loads_done += 1
                if self._pause is not None and self._loads_done > self._pause[1]:
                    self._pause = None
                self._cond.notify_all()

    @property
    def loads_waiting(self) -> int:
        """Loads waiting for the step in progress to end."""
        with self._cond:
            return self._loads_waiting

    def wait_steps(self, count: int, timeout: float | None = None) -> bool:
        """Whether ``count`` steps were taken (False: ``timeout`` seconds passed first)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.steps >= count, timeout)

    def pause_after(self, count: int) -> None:
        """Hold steps past the ``count``-th (counted over the gate's life) until the next load ends."""
        with self._cond:
            self._pause = (count, self._loads_done)
            self._cond.notify_all()
