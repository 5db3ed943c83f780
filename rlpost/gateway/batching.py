"""Coalescing the concurrent requests of one replica into one ``generate`` call.

Many agents talk to the gateway at once, each request blocking its own server thread.
Sampling them one by one would leave the engine decoding a batch of 1 while the rest
queue; instead, requests that arrive while the replica is busy wait together and the
next call samples all of them (those with equal ``SamplingParams``) as one batch.

Contract of ``ReplicaBatcher.generate(prompts, params)``: blocks until these prompts'
completions are sampled (one group of ``params.n`` per prompt, in order); at most one ``generate`` runs on the replica at a time (the
engines are not thread-safe, and a Ray replica serves one call at a time anyway). No
thread of its own: the first waiting caller whose params match nobody running becomes
the leader, runs the call for every queued request with its params, hands each its
result (or the call's exception) and wakes the others. A request is never delayed to
wait for company: a call starts as soon as the replica is free.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from rlpost.types import Completion, SamplingParams

Generate = Callable[[list[list[int]], SamplingParams], list[list[Completion]]]


@dataclass(eq=False)
class _Request:
    prompts: list[list[int]]
    params: SamplingParams
    result: list[list[Completion]] | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


class ReplicaBatcher:
    """One replica's queue; ``generate_fn(prompts, params)`` samples a batch on it."""

    def __init__(self, generate_fn: Generate):
        self.generate_fn = generate_fn
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._busy = False
        self.calls = 0  # generate calls made (for the gateway's batch-size metric)
        self.requests = 0  # requests served

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        me = _Request(prompts, params)
        with self._cond:
            self._queue.append(me)
            while not me.done:
                if self._busy:
                    self._cond.wait()
                    continue
                # Lead: take every queued request sampled like this one, in arrival order.
                batch = [r for r in self._queue if r.params == me.params]
                self._queue = [r for r in self._queue if r.params != me.params]
                self._busy = True
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if me.error is not None:
            raise me.error
        assert me.result is not None
        return me.result

    def _run(self, batch: list[_Request]) -> None:
        try:
            prompts = [p for r in batch for p in r.prompts]
            groups = self.generate_fn(prompts, batch[0].params)
            if len(groups) != len(prompts):
                raise RuntimeError(f"the rollout group returned {len(groups)} groups for {len(prompts)} prompts")
            start = 0
            for r in batch:
                r.result, start = groups[start:start + len(r.prompts)], start + len(r.prompts)
        except BaseException as exc:  # every request of the call sees the failure
            for r in batch:
                r.error = exc
        finally:
            self.calls += 1
            self.requests += len(batch)
            for r in batch:
                r.done = True
