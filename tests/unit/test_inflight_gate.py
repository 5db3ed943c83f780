"""``DecodeGate`` (``rlpost.engines.inflight``): a weight load waits for the decoding step
in progress and goes before the next one; ``pause_after`` holds steps until a load."""

import threading
import time

from rlpost.engines.inflight import DecodeGate


def wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_a_waiting_load_goes_before_the_next_step():
    gate, order = DecodeGate(), []
    in_step, release = threading.Event(), threading.Event()

    def first_step():
        with gate.step():
            in_step.set()
            release.wait(10)
            order.append("step 1")

    def load():
        with gate.load():
            order.append("load")

    def second_step():
        with gate.step():
            order.append("step 2")

    threads = [threading.Thread(target=first_step)]
    threads[0].start()
    in_step.wait(10)
    threads.append(threading.Thread(target=load))
    threads[1].start()
    wait_until(lambda: gate.loads_waiting == 1)  # the load waits for step 1
    threads.append(threading.Thread(target=second_step))
    threads[2].start()
    time.sleep(0.05)
    assert order == []  # step 2 is held behind the waiting load, which is held behind step 1
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["step 1", "load", "step 2"] and gate.steps == 2


def test_pause_after_holds_steps_until_the_next_load():
    gate, steps = DecodeGate(), []
    gate.pause_after(2)

    def generate():
        for i in range(4):
            with gate.step():
                steps.append(i)

    thread = threading.Thread(target=generate)
    thread.start()
    assert gate.wait_steps(2, timeout=10)
    time.sleep(0.05)
    assert steps == [0, 1]  # held after the second step
    assert not gate.wait_steps(3, timeout=0.05)
    with gate.load():
        pass
    thread.join(10)
    assert steps == [0, 1, 2, 3] and gate.steps == 4
