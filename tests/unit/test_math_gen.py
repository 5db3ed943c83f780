import re

import pyarrow.parquet as pq
import pytest

from rlpost.data.math_gen import (
    MAX_LEVEL,
    MathProblem,
    generate_problems,
    is_heldout,
    solution_text,
    write_builtin_math,
)

EQUATION = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")


def test_solution_text_format():
    problem = MathProblem("Tom has 3 apples and buys 5 more. How many apples does Tom have now?", 8, 1, ("3 + 5 = 8",))
    assert solution_text(problem) == "3 + 5 = 8. The answer is \\boxed{8}."
    two = MathProblem("q", 14, 3, ("12 + 5 = 17", "17 - 3 = 14"))
    assert solution_text(two) == "12 + 5 = 17. 17 - 3 = 14. The answer is \\boxed{14}."


def test_solution_is_verified_by_math_verify():
    from math_verify import parse, verify

    problem = MathProblem("q", 42, 4, ("6 * 7 = 42",))
    assert verify(parse("42"), parse(solution_text(problem)))
    assert not verify(parse("41"), parse(solution_text(problem)))


@pytest.mark.parametrize("level", range(1, MAX_LEVEL + 1))
def test_worked_steps_are_correct_arithmetic(level):
    problems = generate_problems(200, level, seed=3, stream="t", heldout=False)
    for p in [p for p in problems if p.level == level]:
        previous = None
        for step in p.steps:
            a, op, b, result = EQUATION.match(step).groups()
            a, b, result = int(a), int(b), int(result)
            assert result == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert result >= 0
            # A step's left operand is either read off the question or the previous result.
            assert previous == a or re.search(rf"\b{a}\b", p.question)
            assert re.search(rf"\b{b}\b", p.question)
            previous = result
        assert p.answer == previous


def test_level_number_ranges():
    problems = generate_problems(400, 4, seed=0, stream="t", heldout=False)
    for p in problems:
        a, _, b, _ = EQUATION.match(p.steps[0]).groups()
        small, big = sorted((int(a), int(b)))
        if p.level in (1, 3):  # single digits only
            assert 1 <= small and big <= 9
        elif p.level == 2:  # one two-digit and one single-digit number
            assert 1 <= small <= 9 and 10 <= big <= 99
        else:  # two two-digit numbers
            assert 10 <= small and big <= 99
    assert {p.level for p in problems} == {1, 2, 3, 4}


def test_deterministic_and_streams_differ():
    a = generate_problems(50, 3, seed=7, stream="train", heldout=False)
    b = generate_problems(50, 3, seed=7, stream="train", heldout=False)
    c = generate_problems(50, 3, seed=8, stream="train", heldout=False)
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]
    assert len({p.question for p in a}) == 50


def test_heldout_partition():
    assert all(is_heldout(p.question) for p in generate_problems(40, 3, 0, "val", heldout=True))
    assert not any(is_heldout(p.question) for p in generate_problems(40, 3, 0, "train", heldout=False))


def test_bad_level_rejected():
    with pytest.raises(ValueError):
        generate_problems(1, MAX_LEVEL + 1, 0, "t", heldout=False)


def test_write_builtin_math(tmp_path):
    train, val = write_builtin_math(tmp_path, train_size=300, val_size=40, max_level=3, seed=1)
    train_rows = pq.read_table(train).to_pylist()
    val_rows = pq.read_table(val).to_pylist()
    assert len(train_rows) == 300 and len(val_rows) == 40
    assert set(train_rows[0]) == {"prompt", "answer", "level"}
    assert all(isinstance(r["answer"], str) and r["answer"].isdigit() for r in train_rows + val_rows)
    assert {r["level"] for r in train_rows} == {1, 2, 3}
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in val_rows}

    # Same parameters: the cached files are reused untouched.
    mtimes = (train.stat().st_mtime_ns, val.stat().st_mtime_ns)
    assert write_builtin_math(tmp_path, 300, 40, 3, 1) == (train, val)
    assert (train.stat().st_mtime_ns, val.stat().st_mtime_ns) == mtimes
    # Other parameters: other files.
    other_train, _ = write_builtin_math(tmp_path, 300, 40, 3, 2)
    assert other_train != train
