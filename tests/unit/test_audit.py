"""audit_reward on hand-made examples whose rates are counted by hand."""

import math
import random
import time

import pytest

from rlpost.rewards import math_reward
from rlpost.rewards.audit import AuditExample, _percentile, audit_reward

# Ground truth 12 everywhere. Correct: 0, 1. Incorrect: 2 (boxed, wrong), 3 (no answer at all).
EXAMPLES = [
    AuditExample("6 + 6 = 12. The answer is \\boxed{12}.", "12", True),
    AuditExample("so 12", "12", True),
    AuditExample("The answer is \\boxed{13}.", "12", False),
    AuditExample("I am not sure.", "12", False),
]


def exact(prompt, completion, ground_truth, metadata):
    from rlpost.rewards import extract_answer

    return float(extract_answer(completion) == ground_truth)


def boxed_only(prompt, completion, ground_truth, metadata):
    return {"format": 1.0 if "\\boxed" in completion else 0.0}


def test_a_sound_reward_has_no_errors_and_no_flags():
    report = audit_reward(exact, EXAMPLES)
    assert (report.n, report.n_correct, report.n_incorrect) == (4, 2, 2)
    assert report.false_positive_rate == 0.0 and report.false_negative_rate == 0.0
    assert report.unparseable_rate == 0.25  # only example 3 states no number
    assert report.format_only_reward == 0.0 and report.correct_mean_reward == 1.0
    assert report.ok and "no flags" in report.summary()


def test_format_only_reward_is_caught():
    report = audit_reward(boxed_only, EXAMPLES)
    # incorrect: example 2 is boxed (passes), example 3 is not -> FP 1/2; correct: example 1 unboxed -> FN 1/2
    assert report.false_positive_rate == 0.5 and report.false_negative_rate == 0.5
    assert report.format_only_reward == 1.0 and report.incorrect_mean_reward == 0.5
    assert report.flag_codes() == {"format_passes"}
    assert report.rows[0]["reward/format"] == 1.0


def test_constant_reward_is_flagged():
    report = audit_reward(lambda p, c, g, m: 1.0, EXAMPLES)
    assert report.false_positive_rate == 1.0 and report.false_negative_rate == 0.0
    assert {"constant", "format_passes"} <= report.flag_codes()


@pytest.mark.parametrize("value,code", [(float("nan"), "nan"), ({"a": float("inf")}, "nan"),
                                        ("1.0", "wrong_type"), (None, "wrong_type"), ({}, "wrong_type")])
def test_invalid_return_values_are_flagged_as_errors(value, code):
    report = audit_reward(lambda p, c, g, m: value, EXAMPLES)
    assert code in report.flag_codes() and report.error_rate == 1.0
    assert math.isnan(report.false_positive_rate)  # nothing was scored


def test_exceptions_are_left_out_of_the_rates():
    def picky(prompt, completion, ground_truth, metadata):
        if "not sure" in completion:
            raise KeyError("boom")
        return exact(prompt, completion, ground_truth, metadata)

    report = audit_reward(picky, EXAMPLES)
    assert report.error_rate == 0.25 and report.false_positive_rate == 0.0  # 1 incorrect scored, 0 passed
    assert "exception" in report.flag_codes() and report.rows[3]["error"] == "KeyError: 'boom'"


def test_nondeterminism_and_timeouts():
    rng = random.Random(0)
    report = audit_reward(lambda p, c, g, m: rng.random(), EXAMPLES[:2])
    assert "nondeterministic" in report.flag_codes()

    report = audit_reward(lambda p, c, g, m: time.sleep(5), EXAMPLES[:1], timeout_s=0.05)
    assert "timeout" in report.flag_codes() and report.error_rate == 1.0


def test_latency_is_at_least_the_time_the_function_sleeps():
    def slow(prompt, completion, ground_truth, metadata):
        time.sleep(0.02)
        return 0.0

    report = audit_reward(slow, EXAMPLES[:2])
    assert report.latency_mean_ms >= 20 and report.latency_p95_ms >= 20
    assert _percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)  # 1 + 0.95 * 4


def test_unlabelled_examples_take_the_verifier_label():
    unlabelled = [{"completion": e.completion, "answer": e.ground_truth} for e in EXAMPLES]
    report = audit_reward(boxed_only, unlabelled, verifier=math_reward)
    assert (report.n_correct, report.n_incorrect) == (2, 2)
    assert [r["correct"] for r in report.rows] == [True, True, False, False]
    with pytest.raises(ValueError, match="verifier="):
        audit_reward(boxed_only, unlabelled)
