"""Admission to the sandbox's run slots: a fixed pool of slots and a bounded FIFO queue.

Contract: ``acquire(wait_s)`` returns a slot index at once when one is free and nobody
is waiting; otherwise the caller joins the queue (unless ``max_queue`` callers already
wait: ``QUEUE_FULL``) and waits at most ``wait_s`` (the request's own deadline, or the
server's maximum queue wait if shorter: ``WAIT_EXPIRED``). ``release(slot)`` hands the
slot straight to the longest waiter, so arrival order is service order and a newcomer
cannot overtake the queue. Every ``acquire`` ends in exactly one of the three outcomes.
"""

from __future__ import annotations

import threading
from collections import deque

QUEUE_FULL = "queue_full"
WAIT_EXPIRED = "wait_expired"


class _Waiter:
    __slots__ = ("event", "slot")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.slot: int | None = None


class SlotPool:
    def __init__(self, capacity: int, max_queue: int):
        self.capacity, self.max_queue = capacity, max_queue
        self._free = list(range(capacity - 1, -1, -1))  # pop() gives slot 0 first
        self._waiters: deque[_Waiter] = deque()
        self._lock = threading.Lock()

    def acquire(self, wait_s: float) -> int | str:
        """A slot index, or ``QUEUE_FULL`` / ``WAIT_EXPIRED``."""
        with self._lock:
            if self._free and not self._waiters:
                return self._free.pop()
            if len(self._waiters) >= self.max_queue or wait_s <= 0:
                return QUEUE_FULL
            waiter = _Waiter()
            self._waiters.append(waiter)
        waiter.event.wait(wait_s)
        with self._lock:
            # release() may have handed us a slot between the timeout and this lock.
            if waiter.slot is not None:
                return waiter.slot
            self._waiters.remove(waiter)
            return WAIT_EXPIRED

    def release(self, slot: int) -> None:
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.slot = slot
                waiter.event.set()
            else:
                self._free.append(slot)

    def usage(self) -> tuple[int, int]:
        """``(busy slots, queued requests)`` now."""
        with self._lock:
            return self.capacity - len(self._free), len(self._waiters)
