"""Built-in arithmetic word problems of graded difficulty (GSM8K in miniature).

Everything here is deterministic for a seed, so the built-in recipe needs no dataset
hub. Levels:

    1  one + or - with numbers 1..9           "Tom has 3 apples and buys 5 more. ..."
    2  one + or - of a number 10..99 and one 1..9
    3  two + / - steps with numbers 1..9
    4  one + or - with numbers 10..99
    5  one multiplication (2..9 x 2..12)      "Tom buys 4 boxes with 6 pens in each box. ..."
    6  a multiplication then a + or -

Levels 1-3 are what the built-in tiny model can partly solve after its short SFT
(the default recipe's range); 4-6 are there for larger models.

Held-out split by construction: every question text falls on one side of a fixed
hash partition (``is_heldout``). Train rows (and the tiny model's SFT data) only use
the train side, val rows only the held-out side, so no val prompt is ever trained on,
whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_LEVEL = 6
# Bump when templates or sampling change: it is part of the cached file names.
GENERATOR_VERSION = 2
_HELDOUT_BUCKETS = 8  # 1 in 8 question texts is held out

NAMES = ("Tom", "Mia", "Sam", "Lily", "Ben", "Emma", "Noah", "Ava", "Leo", "Zoe")
OBJECTS = ("apples", "pens", "books", "cards", "stickers", "marbles", "cookies", "coins", "shells", "toys")
CONTAINERS = ("boxes", "bags", "packs", "jars", "baskets")


@dataclass(frozen=True)
class MathProblem:
    question: str
    answer: int
    level: int
    steps: tuple[str, ...]  # worked equations, e.g. ("3 + 5 = 8",)


def solution_text(problem: MathProblem) -> str:
    """Worked solution for SFT: each equation, then the answer in \\boxed{} so that
    math-verify's boxed parsing finds it. E.g. "3 + 5 = 8. The answer is \\boxed{8}."."""
    work = " ".join(f"{step}." for step in problem.steps)
    return f"{work} The answer is \\boxed{{{problem.answer}}}."


def is_heldout(question: str) -> bool:
    """Fixed partition of question texts; held-out ones are only ever used for val."""
    digest = hashlib.sha256(question.encode()).digest()
    return digest[0] % _HELDOUT_BUCKETS == 0


def _add_or_sub(rng: random.Random, first: tuple[int, int], second: tuple[int, int]) -> tuple[int, str, int, int]:
    """(a, op, b, result) with a from range ``first``, b from ``second`` and a result
    >= 0 (the larger number comes first in a subtraction), so answers are natural numbers."""
    a, b = rng.randint(*first), rng.randint(*second)
    if rng.random() < 0.5:
        a, b = (b, a) if rng.random() < 0.5 else (a, b)
        return a, "+", b, a + b
    a, b = max(a, b), min(a, b)
    return a, "-", b, a - b


def _one_step(rng: random.Random, level: int, first: tuple[int, int], second: tuple[int, int]) -> MathProblem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, op, b, result = _add_or_sub(rng, first, second)
    have_now = f"How many {obj} does {name} have now?"
    if op == "+":
        story, question = rng.choice((
            (f"{name} has {a} {obj} and buys {b} more.", have_now),
            (f"{name} has {a} {obj}. A friend gives {name} {b} more {obj}.", have_now),
            (f"{name} found {a} {obj} on Monday and {b} {obj} on Tuesday.", f"How many {obj} did {name} find?"),
        ))
    else:
        story, question = rng.choice((
            (f"{name} has {a} {obj} and gives away {b}.", have_now),
            (f"{name} had {a} {obj} and lost {b} of them.", have_now),
            (f"There are {a} {obj} in a box. {name} takes out {b}.", f"How many {obj} are left in the box?"),
        ))
    return MathProblem(f"{story} {question}", result, level, (f"{a} {op} {b} = {result}",))


def _two_steps(rng: random.Random, level: int) -> MathProblem:
    (name, friend), obj = rng.sample(NAMES, 2), rng.choice(OBJECTS)
    a, op1, b, mid = _add_or_sub(rng, (1, 9), (1, 9))
    if op1 == "-":
        first = f"{name} has {a} {obj} and gives {b} to {friend}."
    else:
        first = f"{name} has {a} {obj} and buys {b} more."
    c = rng.randint(1, 9)
    if rng.random() < 0.5 or c > mid:
        op2, result = "+", mid + c
        second = rng.choice((f"Then {name} finds {c} more.", f"Later {name} gets {c} more {obj}."))
    else:
        op2, result = "-", mid - c
        second = rng.choice((f"Then {name} loses {c}.", f"Later {name} gives away {c}."))
    steps = (f"{a} {op1} {b} = {mid}", f"{mid} {op2} {c} = {result}")
    return MathProblem(f"{first} {second} How many {obj} does {name} have now?", result, level, steps)


def _product(rng: random.Random, level: int) -> MathProblem:
    name, obj, box = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(CONTAINERS)
    n, per = rng.randint(2, 9), rng.randint(2, 12)
    story = rng.choice((
        f"{name} buys {n} {box} with {per} {obj} in each.",
        f"There are {n} {box}. Each one holds {per} {obj}.",
    ))
    return MathProblem(f"{story} How many {obj} are there in total?", n * per, level, (f"{n} * {per} = {n * per}",))


def _product_then_add_or_sub(rng: random.Random, level: int) -> MathProblem:
    name, obj, box = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(CONTAINERS)
    n, per = rng.randint(2, 9), rng.randint(2, 12)
    total = n * per
    c = rng.randint(1, 30)
    if rng.random() < 0.5 or c > total:
        op, result, tail = "+", total + c, f"{name} also has {c} loose {obj}."
    else:
        op, result, tail = "-", total - c, f"{name} gives away {c} of them."
    question = f"{name} buys {n} {box} with {per} {obj} in each. {tail} How many {obj} does {name} have now?"
    return MathProblem(question, result, level, (f"{n} * {per} = {total}", f"{total} {op} {c} = {result}"))


_LEVELS: dict[int, Callable[[random.Random, int], MathProblem]] = {
    1: lambda rng, lvl: _one_step(rng, lvl, (1, 9), (1, 9)),
    2: lambda rng, lvl: _one_step(rng, lvl, (10, 99), (1, 9)),
    3: _two_steps,
    4: lambda rng, lvl: _one_step(rng, lvl, (10, 99), (10, 99)),
    5: _product,
    6: _product_then_add_or_sub,
}


def generate_problem(rng: random.Random, level: int) -> MathProblem:
    if level not in _LEVELS:
        raise ValueError(f"level must be in 1..{MAX_LEVEL}, got {level}")
    return _LEVELS[level](rng, level)


def generate_problems(n: int, max_level: int, seed: int, stream: str, heldout: bool) -> list[MathProblem]:
    """``n`` distinct problems with levels drawn uniformly from 1..max_level.

    ``stream`` names an independent random stream (train, val, sft, ...): string
    seeds are hashed with SHA-512 by ``random.Random``, so they are stable across
    processes and Python runs. ``heldout`` picks the side of the fixed partition.
    """
    if not 1 <= max_level <= MAX_LEVEL:
        raise ValueError(f"max_level must be in 1..{MAX_LEVEL}, got {max_level}")
    rng = random.Random(f"rlpost-math/v{GENERATOR_VERSION}/{stream}/{seed}")
    seen: set[str] = set()
    out: list[MathProblem] = []
    # The held-out side is 1/8 of the space and duplicates get rarer as n grows;
    # the cap only stops a request larger than the problem space from looping.
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        problem = generate_problem(rng, rng.randint(1, max_level))
        if problem.question in seen or is_heldout(problem.question) != heldout:
            continue
        seen.add(problem.question)
        out.append(problem)
    if len(out) < n:
        raise ValueError(f"could only generate {len(out)} distinct problems of {n} requested (max_level={max_level})")
    return out


def _write_parquet(problems: list[MathProblem], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "prompt": [p.question for p in problems],
        "answer": [str(p.answer) for p in problems],
        "level": [p.level for p in problems],
    })
    # Write to a private name then rename: a concurrent reader never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_builtin_math(out_dir: Path, train_size: int, val_size: int, max_level: int, seed: int) -> tuple[Path, Path]:
    """Write (or reuse) train/val parquet files with columns prompt, answer, level.

    The parameters are encoded in the file names, so a cached file is reused only
    when it was written with the same ones.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"math-v{GENERATOR_VERSION}-L{max_level}-s{seed}"
    train_path = out_dir / f"{tag}-train-{train_size}.parquet"
    val_path = out_dir / f"{tag}-val-{val_size}.parquet"
    if not train_path.exists():
        _write_parquet(generate_problems(train_size, max_level, seed, "train", heldout=False), train_path)
    if not val_path.exists():
        _write_parquet(generate_problems(val_size, max_level, seed, "val", heldout=True), val_path)
    return train_path, val_path
