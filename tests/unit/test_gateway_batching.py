"""ReplicaBatcher (rlpost.gateway.batching): requests that wait for a busy replica are
sampled together in its next call, each gets its own completions back, a failure
reaches every request of its call, and requests sampled differently are not mixed."""

from __future__ import annotations

import threading
import time

import pytest

from rlpost.gateway.batching import ReplicaBatcher
from rlpost.types import Completion, SamplingParams

HOT, COLD = SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)


class Replica:
    """Answers prompt [k] with token k + 100; the first call waits for ``release``."""

    def __init__(self, fail_on=None):
        self.calls, self.release, self.fail_on = [], threading.Event(), fail_on

    def generate(self, prompts, params):
        if not self.calls:
            self.release.wait(10)
        self.calls.append(([p[0] for p in prompts], params.temperature))
        if self.fail_on is not None and [self.fail_on] in prompts:
            raise RuntimeError("replica lost")
        return [[Completion((p[0] + 100,), (-0.5,), "", "stop", 0)] for p in prompts]


def send(batcher, results, key, prompts, params):
    try:
        results[key] = batcher.generate(prompts, params)
    except RuntimeError as exc:
        results[key] = exc


def run_all(batcher, replica, requests):
    """The first request starts (and blocks the replica); the rest queue; then release."""
    results: dict = {}
    threads = [threading.Thread(target=send, args=(batcher, results, i, *req)) for i, req in enumerate(requests)]
    threads[0].start()
    while not replica.calls and not batcher._busy:
        time.sleep(0.001)
    for n, t in enumerate(threads[1:], 1):  # one at a time, so they queue in this order
        t.start()
        deadline = time.monotonic() + 10
        while len(batcher._queue) < n and time.monotonic() < deadline:
            time.sleep(0.001)
    replica.release.set()
    for t in threads:
        t.join(10)
    return results


def test_waiting_requests_share_the_next_call_and_get_their_own_answers():
    replica = Replica()
    batcher = ReplicaBatcher(replica.generate)
    results = run_all(batcher, replica, [([[1]], HOT), ([[2]], HOT), ([[3], [4]], HOT), ([[5]], COLD), ([[6]], HOT)])
    # Call 1: the first request alone; call 2: every queued HOT request (the 3-prompt one
    # included), in arrival order; call 3: the COLD one, never mixed with HOT.
    # (Which of calls 2 and 3 runs first depends on which waiting thread wakes first.)
    assert replica.calls[0] == ([1], 1.0)
    assert sorted(replica.calls[1:]) == [([2, 3, 4, 6], 1.0), ([5], 0.0)]
    assert {k: [[c.token_ids for c in g] for g in v] for k, v in results.items()} == {
        0: [[(101,)]], 1: [[(102,)]], 2: [[(103,)], [(104,)]], 3: [[(105,)]], 4: [[(106,)]]}
    assert batcher.calls == 3 and batcher.requests == 5


def test_a_failed_call_fails_its_requests_only():
    replica = Replica(fail_on=2)
    batcher = ReplicaBatcher(replica.generate)
    results = run_all(batcher, replica, [([[1]], HOT), ([[2]], HOT), ([[3]], HOT), ([[4]], COLD)])
    assert [c[0].token_ids for c in results[0]] == [(101,)]
    assert isinstance(results[1], RuntimeError) and isinstance(results[2], RuntimeError)  # one call: 2 and 3
    assert [c[0].token_ids for c in results[3]] == [(104,)]
    assert batcher.generate([[7]], HOT)[0][0].token_ids == (107,)  # and it keeps serving


def test_a_wrong_number_of_groups_is_an_error():
    batcher = ReplicaBatcher(lambda prompts, params: [])
    with pytest.raises(RuntimeError, match="returned 0 groups for 1 prompts"):
        batcher.generate([[1]], HOT)
