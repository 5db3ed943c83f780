"""Reward API: math_reward on hand-written cases, per-sample isolation of errors,
bad return values and timeouts (on and off the main thread), and loading."""

import signal
import threading
import time

import pytest

from rlpost.errors import RewardError
from rlpost.rewards import (
    RewardTimeout,
    call_with_deadline,
    extract_answer,
    load_reward_fn,
    math_reward,
    score_batch,
    score_one,
)
from rlpost.types import Reward


def _assert_timer_restored(before: tuple[float, float]) -> None:
    """ITIMER_REAL is back to what it was (pytest-timeout may have one armed)."""
    after = signal.getitimer(signal.ITIMER_REAL)
    if before[0] == 0:
        assert after == (0.0, 0.0)
    else:
        assert 0 < after[0] <= before[0] and after[1] == before[1]


# ------------------------------------------------------------------ math_reward


@pytest.mark.parametrize("completion, expected", [
    ("So the total is \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # the last box, nested braces
    ("Natalia sold 48 clips.\n#### 1,024\n", "1024"),
    ("#### 18 dollars", "18"),
    ("We get 3 apples and then 12.5 pears.", "12.5"),
    ("half of it: 1/2", "1/2"),
    ("the truncated \\boxed{12", "12"),  # unbalanced box: fall back to the last number
    ("no answer here", None),
    ("", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion, ground_truth, accuracy", [
    ("The answer is \\boxed{42}", "42", 1.0),
    ("The answer is \\boxed{41}", "42", 0.0),
    ("... so she has 72 clips.\n#### 72", "72", 1.0),
    ("I think it is 5 and then 7", "7", 1.0),
    ("I think it is 7 and then 5", "7", 0.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{1/2}", "0.5", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("", "42", 0.0),
    ("\\boxed{}", "42", 0.0),
    ("The answer is \\boxed{72}", "Natalia sold 48 + 24 = 72 clips.\n#### 72", 1.0),  # GSM8K-style gold
])
def test_math_reward_accuracy(completion, ground_truth, accuracy):
    assert math_reward("question", completion, ground_truth, {}) == {"accuracy": accuracy}


def test_math_reward_format_component():
    assert math_reward("q", "\\boxed{3}", "3", {}, format_weight=0.1) == {"accuracy": 1.0, "format": 0.1}
    assert math_reward("q", "#### 4", "3", {}, format_weight=0.1) == {"accuracy": 0.0, "format": 0.1}
    assert math_reward("q", "it is 3", "3", {}, format_weight=0.1) == {"accuracy": 1.0, "format": 0.0}
    reward = score_one(math_reward, "q", "\\boxed{3}", "3", {}, 5.0, format_weight=0.25)
    assert reward == Reward(total=1.25, components={"accuracy": 1.0, "format": 0.25})


def test_math_reward_unparseable_ground_truth_is_an_error_not_a_zero():
    reward = score_one(math_reward, "q", "\\boxed{3}", "", {}, 5.0)
    assert reward.error is not None and "ground truth" in reward.error


def test_math_reward_pathological_answer_scores_zero_within_its_own_deadline():
    # 9^(9^(9^9)) makes sympy hang; the inner deadline (0.5 s) fires under the
    # outer one (10 s), scores 0 rather than erroring, and the timers are cleaned up.
    handler_before = signal.getsignal(signal.SIGALRM)
    timer_before = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    reward = score_one(math_reward, "q", "\\boxed{9^{9^{9^{9}}}}", "1", {}, 10.0, verify_timeout_s=0.5)
    assert time.monotonic() - start < 3.0
    assert reward == Reward(total=0.0, components={"accuracy": 0.0})
    _assert_timer_restored(timer_before)
    assert signal.getsignal(signal.SIGALRM) is handler_before


# ------------------------------------------------------------------ isolation and validation


def _raises(prompt, completion, ground_truth, metadata):
    return 1 / 0


@pytest.mark.parametrize("value, fragment", [
    (None, "returned None"),
    (float("nan"), "returned nan"),
    (float("inf"), "returned inf"),
    ("1.0", "returned str '1.0'"),
    ([1.0], "returned list [1.0]"),
    ({}, "empty dict"),
    ({"acc": "1"}, "component 'acc' is str"),
    ({"acc": float("nan")}, "component 'acc'"),
    ({1: 1.0}, "key 1 is a int"),
])
def test_invalid_return_values_become_errors(value, fragment):
    reward = score_one(lambda *args: value, "q", "c", "g", {}, 5.0)
    assert reward.total == 0.0 and reward.error is not None
    assert fragment in reward.error


def test_valid_return_values():
    assert score_one(lambda *a: 0.5, "q", "c", "g", {}, 5.0) == Reward(total=0.5)
    assert score_one(lambda *a: True, "q", "c", "g", {}, 5.0) == Reward(total=1.0)
    assert score_one(lambda *a: {"a": 0.5, "b": 0.25}, "q", "c", "g", {}, 5.0) == \
        Reward(total=0.75, components={"a": 0.5, "b": 0.25})


def test_exception_is_isolated_per_sample():
    reward = score_one(_raises, "q", "c", "g", {}, 5.0)
    assert reward.total == 0.0 and reward.error.startswith("ZeroDivisionError: division by zero at ")


def _spin(*args, **kwargs):
    while True:
        pass


def _swallow_then_spin(*args, **kwargs):
    try:
        _spin()
    except BaseException:
        pass
    _spin()  # the re-fired alarm interrupts this loop too


def _swallow_and_return(*args, **kwargs):
    try:
        _spin()
    except BaseException:
        return 1.0


@pytest.mark.parametrize("fn", [_spin, _swallow_then_spin, _swallow_and_return])
def test_infinite_loop_times_out_on_the_main_thread(fn):
    timer_before = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    reward = score_one(fn, "q", "c", "g", {}, 0.3)
    assert 0.3 <= time.monotonic() - start < 1.5
    assert reward.total == 0.0 and "timed out after 0.3 s" in reward.error
    _assert_timer_restored(timer_before)


def test_an_enclosing_timer_is_restored():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(True))
    previous_timer = signal.getitimer(signal.ITIMER_REAL)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert score_one(lambda *a: 1.0, "q", "c", "g", {}, 5.0) == Reward(total=1.0)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0 and not fired
    finally:
        signal.signal(signal.SIGALRM, previous)
        signal.setitimer(signal.ITIMER_REAL, *previous_timer)


def test_call_with_deadline_raises_reward_timeout():
    with pytest.raises(RewardTimeout):
        call_with_deadline(_spin, (), {}, 0.2)
    assert call_with_deadline(max, (1, 2), {}, 0.2) == 2


def _on_a_thread(fn, *args, **kwargs):
    result = []
    thread = threading.Thread(target=lambda: result.append(fn(*args, **kwargs)))
    thread.start()
    thread.join(30)
    assert result, "scoring on a thread did not finish"
    return result[0]


def test_off_the_main_thread_a_worker_process_enforces_the_timeout():
    start = time.monotonic()
    reward = _on_a_thread(score_one, _spin, "q", "c", "g", {}, 0.3)
    assert time.monotonic() - start < 3.0
    assert reward.total == 0.0 and "timed out after 0.3 s" in reward.error
    assert _on_a_thread(score_one, _raises, "q", "c", "g", {}, 5.0).error.startswith("ZeroDivisionError")
    items = [("q", "\\boxed{2}", "2", {}), ("q", "x", "g", {}), ("q", "\\boxed{3}", "2", {})]
    fn = lambda p, c, g, m, **kw: _spin() if c == "x" else math_reward(p, c, g, m, **kw)  # noqa: E731
    rewards = _on_a_thread(score_batch, fn, items, 1.0, {"format_weight": 0.5})
    assert rewards[0] == Reward(total=1.5, components={"accuracy": 1.0, "format": 0.5})
    assert "timed out" in rewards[1].error
    assert rewards[2] == Reward(total=0.5, components={"accuracy": 0.0, "format": 0.5})  # worker re-forked


def test_score_batch_keeps_order_and_passes_kwargs():
    items = [("q", f"\\boxed{{{i}}}", "2", {}) for i in range(4)]
    rewards = score_batch(math_reward, items, 5.0, {"format_weight": 0.5})
    assert [r.total for r in rewards] == [0.5, 0.5, 1.5, 0.5]


# ------------------------------------------------------------------ loading


def test_load_reward_fn_from_module_and_file(tmp_path):
    assert load_reward_fn("rlpost.rewards.math:math_reward") is math_reward
    path = tmp_path / "my_reward.py"
    path.write_text("def length_reward(prompt, completion, ground_truth, metadata, scale=1.0):\n"
                    "    return {'length': scale * len(completion)}\n")
    fn = load_reward_fn(f"{path}:length_reward", kwargs={"scale": 0.5})
    assert score_one(fn, "q", "abcd", "g", {}, 5.0, scale=0.5).total == 2.0
    assert _on_a_thread(score_one, fn, "q", "abcd", "g", {}, 5.0).total == 4.0  # reaches a forked worker


@pytest.mark.parametrize("spec, fragment", [
    ("rlpost.rewards.math", "must look like"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("rlpost.rewards.math:no_such_fn", "has no attribute 'no_such_fn'"),
    ("rlpost.rewards.math:_MAX_ANSWER_CHARS", "not a callable"),
    ("/nonexistent/dir/reward.py:fn", "does not exist"),
])
def test_bad_specs_raise_reward_error(spec, fragment):
    with pytest.raises(RewardError, match=fragment):
        load_reward_fn(spec)


def test_broken_file_and_bad_signature_raise_reward_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def fn(:\n")
    with pytest.raises(RewardError, match="importing reward file .* failed: SyntaxError"):
        load_reward_fn(f"{broken}:fn")
    with pytest.raises(RewardError, match="cannot be called"):
        load_reward_fn("rlpost.rewards.math:math_reward", kwargs={"no_such_kwarg": 1})
    two_args = tmp_path / "two_args.py"
    two_args.write_text("def fn(prompt, completion):\n    return 0.0\n")
    with pytest.raises(RewardError, match="cannot be called"):
        load_reward_fn(f"{two_args}:fn", kwargs={})



@pytest.mark.integration
def test_timeout_inside_a_ray_actor_uses_the_main_thread(tmp_path):
    """A default (max_concurrency=1) Ray actor runs its methods on the process's main
    thread, so the in-process SIGALRM deadline applies there; threads and threaded
    actors take the worker-process path tested above."""
    ray = pytest.importorskip("ray")
    path = tmp_path / "slow_reward.py"
    path.write_text("def reward(prompt, completion, ground_truth, metadata):\n"
                    "    while completion == 'spin':\n"
                    "        pass\n"
                    "    return 1.0\n")

    @ray.remote
    class Scorer:
        def score(self, spec, items):
            import threading

            from rlpost.rewards import load_reward_fn, score_batch

            on_main = threading.current_thread() is threading.main_thread()
            return on_main, score_batch(load_reward_fn(spec), items, 0.5)

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        actor = Scorer.options(num_cpus=0).remote()
        on_main, rewards = ray.get(actor.score.remote(f"{path}:reward", [("q", "spin", "g", {}), ("q", "ok", "g", {})]),
                                   timeout=120)
        assert on_main
        assert "timed out after 0.5 s" in rewards[0].error and rewards[1] == Reward(total=1.0)
    finally:
        if started:
            ray.shutdown()
