"""Math answer checking with ``math_verify``: the default reward for math recipes.

The answer is extracted from the completion first (``extract_answer``: the last
``\\boxed{...}``, else a GSM8K ``#### 42`` line, else the last number in the text)
and only that short string is handed to ``math_verify``; parsing the whole
completion would be slower and would match numbers from the reasoning.

Timeouts: ``math_verify`` enforces its own with ``signal.alarm``, which raises
outside the main thread and, on the main thread, would cancel the SIGALRM deadline
``rlpost.rewards.score_one`` has armed around this function. So its own timeouts are
turned off and parse/verify run under ``call_with_deadline`` instead, which nests
with the outer deadline. Off the main thread there is no in-process deadline; there
``score_one`` runs the function in a worker process that it kills on timeout.
A verification that times out scores accuracy 0 (the answer is not *errored*):
otherwise a policy could dodge negative advantages by emitting answers such as
``9^{9^{9^9}}`` that make sympy hang.
"""

from __future__ import annotations

import functools
import logging
import re

import math_verify

from rlpost.rewards.api import RewardTimeout, call_with_deadline

# Longer extracted answers are scored 0 without parsing: real final answers are
# short, and sympy time grows quickly with expression size.
_MAX_ANSWER_CHARS = 200

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = "####"
# 1,234,567.89 | -12.5 | 3/4  (thousands separators only in groups of three)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def _silence_math_verify_timeout_warning() -> None:
    """math_verify (0.9) logs "Timeout is disabled ... you must provide the logic for
    timeout interruption yourself" the first time a timeout of None is passed. We do
    provide it (module docstring), so that one message is dropped; every other
    math_verify log record passes through."""

    class _DropTimeoutDisabled(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Timeout is disabled" not in str(record.msg)

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabled())


_silence_math_verify_timeout_warning()


def _last_boxed(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed{...}`` (nested braces allowed)."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def _hashes_answer(text: str) -> str | None:
    """What follows the last ``####`` on its line: the leading number if there is one."""
    at = text.rfind(_HASHES)
    if at < 0:
        return None
    line = text[at + len(_HASHES):].split("\n", 1)[0].strip().lstrip("$").strip()
    number = _NUMBER.match(line)
    if number:
        return number.group(0).replace(",", "")
    return line.rstrip(".").strip() or None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, or None when it states none.

    Order: the last ``\\boxed{...}``, then a GSM8K ``#### answer`` line, then the last
    number in the text (thousands separators removed: ``1,000`` -> ``1000``).
    """
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    hashes = _hashes_answer(text)
    if hashes is not None:
        return hashes
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def has_answer_format(text: str) -> bool:
    """True when the completion marks its answer (``\\boxed{}`` or ``####``)."""
    boxed = _last_boxed(text)
    return (boxed is not None and bool(boxed.strip())) or _hashes_answer(text) is not None


def _parse(answer: str, timeout_s: float) -> list:
    # Wrapping in \boxed{} makes math_verify read the string as one LaTeX answer.
    return call_with_deadline(
        math_verify.parse, ("\\boxed{" + answer + "}",), {"parsing_timeout": None}, timeout_s
    )


@functools.lru_cache(maxsize=8192)
def _parse_gold(ground_truth: str, timeout_s: float) -> tuple:
    # The gold answer repeats for every sample of a group: parse it once. A ground
    # truth that is a full GSM8K solution or contains \boxed{} is reduced to its answer.
    text = ground_truth.strip()
    if _last_boxed(text) is not None or _HASHES in text:
        text = extract_answer(text) or ""
    parsed = _parse(text, timeout_s) if text else []
    if not parsed:
        raise ValueError(f"cannot parse the ground truth {ground_truth!r} as a math answer")
    return tuple(parsed)


def math_reward(prompt: str, completion: str, ground_truth: str, metadata: dict,
                format_weight: float = 0.0, verify_timeout_s: float = 2.0) -> dict[str, float]:
    """``{"accuracy": 1.0 | 0.0}``, plus ``"format"`` when ``format_weight > 0``.

    accuracy: ``math_verify`` equivalence of the extracted answer and the ground
    truth (``0.5`` == ``1/2`` == ``\\frac{1}{2}``). format: ``format_weight`` when the
    completion marks its answer with ``\\boxed{}`` or ``####``, else 0. The total
    reward is the sum of the two. An unparseable ground truth raises (the sample is
    then reported as errored, not scored). ``verify_timeout_s`` bounds each of
    parse and verify on the main thread.
    """
    gold = list(_parse_gold(ground_truth, verify_timeout_s))
    answer = extract_answer(completion)
    correct = False
    if answer is not None and len(answer) <= _MAX_ANSWER_CHARS:
        try:
            pred = _parse(answer, verify_timeout_s)
            correct = bool(pred) and bool(call_with_deadline(
                math_verify.verify, (gold, pred), {"timeout_seconds": None}, verify_timeout_s))
        except RewardTimeout:
            correct = False
    result = {"accuracy": 1.0 if correct else 0.0}
    if format_weight > 0:
        result["format"] = format_weight if has_answer_format(completion) else 0.0
    return result
