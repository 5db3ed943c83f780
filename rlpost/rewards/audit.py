"""Audit a reward function before training on it.

    report = audit_reward(my_reward, examples)            # examples labelled correct / incorrect
    report = audit_reward(my_reward, samples, verifier=math_reward)   # or labelled by a reference
    report.flags    # e.g. ("format_passes: ...",)

What it measures, over ``examples`` (completions with a ground truth and a label):

* false-positive rate: share of *incorrect* completions the reward passes
  (total >= ``pass_threshold``); false-negative rate: share of *correct* ones it fails.
  Samples whose call errored are left out of both and counted in ``error_rate``.
* unparseable rate: share of completions from which ``parse_fn`` (default: the math
  answer extractor) gets no answer.
* reward earned by format alone: the mean reward of probes that are well formed but
  wrong (``The answer is \\boxed{<ground truth perturbed>}.``, one per example), and the
  mean reward of the incorrect examples.
* latency per call (mean and p95, in ms), measured around the bare call.
* flags: constant output, NaN/inf, wrong return type, exceptions, timeouts,
  nondeterminism (the same input scored twice differs), format alone passing.

Each call goes through ``call_with_deadline`` and ``to_reward`` as in training, so
a value that training would reject is reported here as the same kind of error.
"""

from __future__ import annotations

import math
import numbers
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlpost.rewards.api import RewardTimeout, call_with_deadline, to_reward
from rlpost.rewards.math import extract_answer

_NONDETERMINISM_PROBES = 8  # examples scored a second time


@dataclass(frozen=True)
class AuditExample:
    completion: str
    ground_truth: str
    correct: bool | None = None  # None: label it with audit_reward's verifier
    prompt: str = ""
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CallResult:
    total: float | None  # None when the call failed (error is set)
    components: dict
    error: str | None
    kind: str  # ok | nan | wrong_type | exception | timeout
    latency_s: float


@dataclass(frozen=True)
class AuditReport:
    n: int
    n_correct: int
    n_incorrect: int
    false_positive_rate: float  # incorrect examples passed / incorrect examples scored (nan if none)
    false_negative_rate: float  # correct examples failed / correct examples scored (nan if none)
    unparseable_rate: float
    error_rate: float  # calls that raised, timed out, or returned an invalid value
    format_only_reward: float  # mean reward of well-formed wrong-answer probes
    incorrect_mean_reward: float
    correct_mean_reward: float
    latency_mean_ms: float
    latency_p95_ms: float
    flags: tuple[str, ...]  # "<code>: <explanation>"; empty when nothing looks wrong
    rows: tuple[dict, ...] = ()  # one per example: label, total, components, error, parsed, latency

    @property
    def ok(self) -> bool:
        return not self.flags

    def flag_codes(self) -> set[str]:
        return {f.split(":", 1)[0] for f in self.flags}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(list(self.rows))

    def summary(self) -> str:
        lines = [
            f"examples: {self.n} ({self.n_correct} correct, {self.n_incorrect} incorrect)",
            f"false-positive rate: {self.false_positive_rate:.3f}   false-negative rate: {self.false_negative_rate:.3f}",
            f"unparseable: {self.unparseable_rate:.3f}   errors: {self.error_rate:.3f}",
            f"reward by format alone: {self.format_only_reward:.3f}   mean reward incorrect/correct: "
            f"{self.incorrect_mean_reward:.3f} / {self.correct_mean_reward:.3f}",
            f"latency: mean {self.latency_mean_ms:.2f} ms, p95 {self.latency_p95_ms:.2f} ms",
        ]
        lines += [f"FLAG {f}" for f in self.flags] or ["no flags"]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(self.summary())}</pre>"


def audit_reward(fn: Callable[..., Any], examples: Sequence[AuditExample | Mapping | Any], *,
                 verifier: Callable[..., Any] | None = None, pass_threshold: float = 0.5,
                 parse_fn: Callable[[str], Any] = extract_answer, timeout_s: float = 10.0,
                 kwargs: Mapping[str, Any] | None = None) -> AuditReport:
    """Audit ``fn`` (a reward function, see ``rlpost.rewards.api``) on ``examples``.

    An example is an ``AuditExample``, a dict with ``completion``, ``ground_truth``
    (or ``answer``), optional ``correct``/``prompt``/``metadata``, or any object with
    those attributes (e.g. ``rlpost.prototype.Sample``). An unlabelled example is
    labelled by ``verifier`` (a reward function; correct when its total >=
    ``pass_threshold``); without a verifier every example needs a label."""
    items = [_as_example(e, i) for i, e in enumerate(examples)]
    if not items:
        raise ValueError("audit_reward needs at least one example")
    labels = [_label(e, i, verifier, pass_threshold, timeout_s) for i, e in enumerate(items)]
    kwargs = dict(kwargs or {})
    results = [_call(fn, e, kwargs, timeout_s) for e in items]
    probes = [_call(fn, AuditExample(_format_probe(e.ground_truth), e.ground_truth, False, e.prompt, e.metadata),
                    kwargs, timeout_s) for e in items]
    repeats = [_call(fn, e, kwargs, timeout_s) for e in items[:_NONDETERMINISM_PROBES]]

    def passes(r: CallResult) -> bool:
        return r.total is not None and r.total >= pass_threshold

    scored = [(label, r) for label, r in zip(labels, results) if r.total is not None]
    correct = [r for label, r in scored if label]
    incorrect = [r for label, r in scored if not label]
    latencies = sorted(r.latency_s * 1000 for r in results)
    format_only = _mean([p.total for p in probes if p.total is not None])
    parsed = [parse_fn(e.completion) for e in items]
    report = dict(
        n=len(items), n_correct=sum(labels), n_incorrect=len(items) - sum(labels),
        false_positive_rate=_mean([float(passes(r)) for r in incorrect]),
        false_negative_rate=_mean([float(not passes(r)) for r in correct]),
        unparseable_rate=_mean([float(p is None) for p in parsed]),
        error_rate=_mean([float(r.total is None) for r in results]),
        format_only_reward=format_only,
        incorrect_mean_reward=_mean([r.total for r in incorrect]),
        correct_mean_reward=_mean([r.total for r in correct]),
        latency_mean_ms=_mean(latencies), latency_p95_ms=_percentile(latencies, 95),
    )
    flags = _flags(results + probes, results, repeats, format_only, pass_threshold)
    rows = tuple({"completion": e.completion, "ground_truth": e.ground_truth, "correct": label,
                  "parsed": p, "reward": r.total, **{f"reward/{k}": v for k, v in r.components.items()},
                  "error": r.error, "latency_ms": r.latency_s * 1000}
                 for e, label, p, r in zip(items, labels, parsed, results))
    return AuditReport(**report, flags=tuple(flags), rows=rows)


def _as_example(example, index: int) -> AuditExample:
    if isinstance(example, AuditExample):
        return example
    get = example.get if isinstance(example, Mapping) else (lambda k, d=None: getattr(example, k, d))
    completion = get("completion")
    truth = get("ground_truth", get("answer"))
    if completion is None or truth is None:
        raise TypeError(f"example {index} needs a completion and a ground_truth (or answer); got {example!r:.200}")
    return AuditExample(str(completion), str(truth), get("correct"), str(get("prompt", "") or ""),
                        dict(get("metadata", None) or {}))


def _label(example: AuditExample, index: int, verifier, threshold: float, timeout_s: float) -> bool:
    if example.correct is not None:
        return bool(example.correct)
    if verifier is None:
        raise ValueError(f"example {index} has no 'correct' label: label every example or pass verifier= "
                         f"(a reference reward function, e.g. rlpost.rewards.math_reward)")
    result = _call(verifier, example, {}, timeout_s)
    if result.total is None:
        raise ValueError(f"the verifier failed on example {index}: {result.error}")
    return result.total >= threshold


def _call(fn, example: AuditExample, kwargs: Mapping[str, Any], timeout_s: float) -> CallResult:
    args = (example.prompt, example.completion, example.ground_truth, dict(example.metadata))
    start = time.perf_counter()
    try:
        value = call_with_deadline(fn, args, kwargs, timeout_s)
    except RewardTimeout as exc:
        return CallResult(None, {}, f"timeout: {exc}", "timeout", time.perf_counter() - start)
    except Exception as exc:
        return CallResult(None, {}, f"{type(exc).__name__}: {exc}", "exception", time.perf_counter() - start)
    latency = time.perf_counter() - start
    reward = to_reward(value)
    if reward.error is None:
        return CallResult(reward.total, dict(reward.components), None, "ok", latency)
    values = list(value.values()) if isinstance(value, Mapping) else [value]
    non_finite = any(isinstance(v, numbers.Real) and not math.isfinite(float(v)) for v in values)
    return CallResult(None, {}, reward.error, "nan" if non_finite else "wrong_type", latency)


def _format_probe(ground_truth: str) -> str:
    """A well-formed completion whose answer is not ``ground_truth``."""
    number = re.fullmatch(r"-?\d+(?:\.\d+)?", ground_truth.strip().replace(",", ""))
    wrong = str(int(float(number.group(0))) + 1) if number else f"{ground_truth} + 1"
    return f"The answer is \\boxed{{{wrong}}}."


def _flags(all_calls, results, repeats, format_only: float, threshold: float) -> list[str]:
    flags = []
    kinds = [r.kind for r in all_calls]
    if "nan" in kinds:
        flags.append(f"nan: {kinds.count('nan')} call(s) returned NaN or inf; training counts them as errors")
    if "wrong_type" in kinds:
        example = next(r.error for r in all_calls if r.kind == "wrong_type")
        flags.append(f"wrong_type: {kinds.count('wrong_type')} call(s) returned an invalid value ({example})")
    if "exception" in kinds:
        example = next(r.error for r in all_calls if r.kind == "exception")
        flags.append(f"exception: {kinds.count('exception')} call(s) raised ({example})")
    if "timeout" in kinds:
        flags.append(f"timeout: {kinds.count('timeout')} call(s) ran past the deadline")
    totals = [r.total for r in results if r.total is not None]
    if len(totals) >= 2 and max(totals) == min(totals):
        flags.append(f"constant: every example scored {totals[0]:g}; the reward gives GRPO no signal")
    if any(a.total != b.total for a, b in zip(results, repeats)
           if a.total is not None and b.total is not None):
        flags.append("nondeterministic: the same input scored twice gave different rewards")
    if not math.isnan(format_only) and format_only >= threshold:
        flags.append(f"format_passes: a well-formed wrong answer earns {format_only:.3g} >= pass threshold "
                     f"{threshold:g}; the policy can be paid for format alone")
    return flags


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
