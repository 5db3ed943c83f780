"""The reward-function API: what a user's reward function looks like, how rlpost
loads it from a config string, and how one sample is scored in isolation.

A reward function is any callable

    fn(prompt: str, completion: str, ground_truth: str, metadata: dict, **kwargs)
        -> float | dict[str, float]

``prompt`` is the raw question (``PromptSample.question``, not the chat-templated
text), ``completion`` the decoded sampled text, ``ground_truth`` the dataset answer,
``metadata`` the dataset row's extra fields, and ``kwargs`` come from
``reward.kwargs`` in the config. It returns either one number or a dict of named
components; the total reward is then the **sum** of the components (weight a
component inside the function if it should count less). Every value must be a
finite real number (bool counts as 0/1).

Per-sample isolation (``score_one``): an exception, a timeout or an invalid return
value never crashes the run; it becomes ``Reward(total=0.0, error=...)`` and the
caller excludes that sample from group statistics.

Timeouts. A Python thread cannot be killed, so a thread-with-a-timeout would leave a
runaway reward function burning a core forever. Two mechanisms are used instead:

* On the main thread of the process (a Ray task, or a method of a default
  ``max_concurrency=1`` Ray actor, runs there; verified with Ray 2.60) the function
  runs in-process under a ``SIGALRM`` interval timer (``signal.setitimer``), whose
  handler raises ``RewardTimeout`` inside the function. This costs microseconds per
  call, interrupts pure-Python loops, ``time.sleep`` and the ``re`` engine, nests
  with an enclosing timer (the outer deadline is restored afterwards), and re-fires
  every 0.1 s so a function that swallows the exception with a bare ``except`` is
  interrupted again. It cannot interrupt a C extension that never returns to the
  interpreter.
* Anywhere else (a threaded or async actor, a thread pool) signals are unavailable,
  so the function runs in a forked worker process that is killed on timeout and
  forked again for the next sample. That also survives segfaults and ``os._exit``,
  at the price of a fork (milliseconds) per worker and picklable inputs/outputs.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import multiprocessing
import numbers
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from rlpost.errors import RewardError
from rlpost.types import Reward

RewardFn = Callable[[str, str, str, dict], "float | dict[str, float]"]

# Seconds between repeated SIGALRMs after the deadline, for functions that catch
# RewardTimeout and keep going.
_REFIRE_S = 0.1


class RewardInput(NamedTuple):
    """Arguments of one reward call; a plain 4-tuple works as well."""

    prompt: str
    completion: str
    ground_truth: str
    metadata: dict


class RewardTimeout(BaseException):
    """Raised inside a reward function when its deadline passes.

    A ``BaseException`` on purpose (like ``KeyboardInterrupt``): a reward function's
    own ``except Exception`` must not swallow it. It never escapes ``score_one``.
    """


# --------------------------------------------------------------------------- loading


def load_reward_fn(spec: str, kwargs: Mapping[str, Any] | None = None) -> Callable[..., Any]:
    """Import a reward function from ``"package.module:function"`` or
    ``"path/to/file.py:function"`` (relative paths are resolved from the current
    directory). ``function`` may be dotted (``"mod:Class.method"``).

    With ``kwargs``, also checks that the function accepts
    ``(prompt, completion, ground_truth, metadata, **kwargs)``.
    Raises ``RewardError`` saying what to change.
    """
    module_part, sep, attr_path = spec.rpartition(":")
    if not sep or not module_part or not attr_path:
        raise RewardError(
            f"reward function spec {spec!r} must look like 'package.module:function' "
            f"or 'path/to/file.py:function'"
        )
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        module = _import_file(module_part, spec)
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:  # ImportError, or any error the module raises at import
            raise RewardError(
                f"cannot import module {module_part!r} for reward function {spec!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise RewardError(
                f"{module_part!r} has no attribute {attr_path!r} (reward function {spec!r}); "
                f"callables it defines: {public}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward function {spec!r} is a {type(obj).__name__}, not a callable")
    if kwargs is not None:
        _check_signature(obj, spec, kwargs)
    return obj


def _import_file(path: str, spec: str) -> Any:
    abs_path = os.path.abspath(path)
    if not os.path.isfile(abs_path):
        raise RewardError(f"reward function file {abs_path!r} (from {spec!r}) does not exist")
    # A stable, unique module name registered in sys.modules, so the function pickles
    # by reference (Ray, forked workers) and dataclasses in the file work.
    name = "rlpost_reward_" + "".join(c if c.isalnum() else "_" for c in abs_path)
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, abs_path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"cannot load {abs_path!r} as a Python module (from {spec!r})")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        raise RewardError(
            f"importing reward file {abs_path!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _check_signature(fn: Callable[..., Any], spec: str, kwargs: Mapping[str, Any]) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; nothing to check
        return
    try:
        sig.bind("prompt", "completion", "ground_truth", {}, **kwargs)
    except TypeError as exc:
        raise RewardError(
            f"reward function {spec!r}{sig} cannot be called as "
            f"fn(prompt, completion, ground_truth, metadata, **{dict(kwargs)!r}): {exc}. "
            f"Fix its signature or reward.kwargs."
        ) from exc


# --------------------------------------------------------------------------- deadlines


def call_with_deadline(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
                       timeout_s: float | None) -> Any:
    """``fn(*args, **kwargs)``, raising ``RewardTimeout`` if it runs past ``timeout_s``.

    Uses SIGALRM, so the deadline is enforced only on the main thread; elsewhere (or
    with ``timeout_s`` None/<= 0) this is a plain call. Nests: an enclosing
    deadline that expires first still wins, and it is re-armed on return.
    """
    if not timeout_s or timeout_s <= 0 or threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)

    me = sys._getframe()
    interrupted = [False]

    def on_alarm(signum: int, frame: Any) -> None:
        # Raise only inside fn (a frame below this one); when the alarm lands in this
        # wrapper's own code, fn has returned and there is nothing to interrupt.
        f = frame
        if f is me:
            return
        while f is not None:
            if f is me:
                interrupted[0] = True
                raise RewardTimeout(f"timed out after {timeout_s:g} s")
            f = f.f_back

    outer_handler = signal.getsignal(signal.SIGALRM)
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    delay = min(timeout_s, outer_delay) if outer_delay > 0 else timeout_s
    start = time.monotonic()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, delay, _REFIRE_S)
    try:
        result = fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_delay > 0:
            remaining = outer_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-4), outer_interval)
    if interrupted[0]:  # fn swallowed the interrupt and returned late: still a timeout
        raise RewardTimeout(f"timed out after {timeout_s:g} s (the function caught the interrupt)")
    return result


# --------------------------------------------------------------------------- scoring


def to_reward(value: Any) -> Reward:
    """Validate a reward function's return value and turn it into a ``Reward``."""
    expected = "expected a finite float or a dict[str, float] of components"
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            return Reward(total=0.0, error=f"reward function returned {number}; {expected}")
        return Reward(total=number)
    if isinstance(value, Mapping):
        if not value:
            return Reward(total=0.0, error=f"reward function returned an empty dict; {expected}")
        components: dict[str, float] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                return Reward(total=0.0, error=f"reward component key {key!r} is a {type(key).__name__}; keys must be str")
            if not isinstance(item, numbers.Real) or not math.isfinite(float(item)):
                return Reward(total=0.0, error=f"reward component {key!r} is {_describe(item)}; "
                                               f"components must be finite floats")
            components[key] = float(item)
        return Reward(total=sum(components.values()), components=components)
    return Reward(total=0.0, error=f"reward function returned {_describe(value)}; {expected}")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "None"


def _error_reward(exc: BaseException) -> Reward:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return Reward(total=0.0, error=f"{type(exc).__name__}: {exc}{where}")


def _score_in_process(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
                      timeout_s: float | None) -> Reward:
    try:
        value = call_with_deadline(fn, args, kwargs, timeout_s)
    except RewardTimeout as exc:
        return Reward(total=0.0, error=f"reward function {exc}")
    except (Exception, SystemExit) as exc:  # KeyboardInterrupt still stops the run
        return _error_reward(exc)
    return to_reward(value)


class _ForkedScorer:
    """Runs ``fn`` in a forked child process, one sample at a time; the child is
    killed when a sample times out (or dies) and forked again on the next sample.

    ``fn`` reaches the child through fork, not pickling, so functions loaded from a
    file work; the sample arguments and the ``Reward`` travel through a pipe.
    """

    def __init__(self, fn: Callable[..., Any]):
        self._fn = fn
        self._proc: Any = None
        self._conn: Any = None

    def score(self, args: Sequence[Any], kwargs: Mapping[str, Any], timeout_s: float | None) -> Reward:
        if self._proc is None:
            self._start()
        try:
            self._conn.send((tuple(args), dict(kwargs)))
        except Exception as exc:  # unpicklable metadata or kwargs
            self.close()
            return Reward(total=0.0, error=f"cannot send the sample to the reward worker process: {exc}")
        if not self._conn.poll(timeout_s if timeout_s and timeout_s > 0 else None):
            self.close()
            return Reward(total=0.0, error=f"reward function timed out after {timeout_s:g} s (worker process killed)")
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(1.0)
            code = self._proc.exitcode
            self.close()
            return Reward(total=0.0, error=f"reward worker process died (exit code {code}) while scoring")

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=_forked_scorer_main, args=(self._fn, child_end, parent_end),
                                 daemon=True, name="rlpost-reward")
        self._proc.start()
        child_end.close()
        self._conn = parent_end

    def close(self) -> None:
        if self._proc is None:
            return
        self._conn.close()
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        self._proc = self._conn = None


def _forked_scorer_main(fn: Callable[..., Any], conn: Any, parent_end: Any) -> None:
    parent_end.close()  # so recv() sees EOF when the parent goes away
    while True:
        try:
            args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        reward = _score_in_process(fn, args, kwargs, None)
        try:
            conn.send(reward)
        except Exception as exc:  # e.g. an unpicklable component name; keep serving
            conn.send(Reward(total=0.0, error=f"cannot return the reward from the worker process: {exc}"))


def _signals_available() -> bool:
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")


def score_one(fn: Callable[..., Any], prompt: str, completion: str, ground_truth: str,
              metadata: dict, timeout_s: float | None, **kwargs: Any) -> Reward:
    """Score one completion; never raises for a per-sample failure.

    Exceptions, timeouts (``timeout_s`` seconds; None or <= 0 disables) and invalid
    return values become ``Reward(total=0.0, error=...)``. See the module docstring
    for how the timeout is enforced on and off the main thread.
    """
    args = (prompt, completion, ground_truth, metadata)
    if not timeout_s or timeout_s <= 0 or _signals_available():
        return _score_in_process(fn, args, kwargs, timeout_s)
    scorer = _ForkedScorer(fn)
    try:
        return scorer.score(args, kwargs, timeout_s)
    finally:
        scorer.close()


def score_batch(fn: Callable[..., Any], items: Sequence[RewardInput | tuple[str, str, str, dict]],
                timeout_s: float | None, kwargs: Mapping[str, Any] | None = None) -> list[Reward]:
    """``score_one`` over ``items`` in order (one worker process for the whole batch
    when not on the main thread)."""
    kwargs = dict(kwargs or {})
    if not timeout_s or timeout_s <= 0 or _signals_available():
        return [_score_in_process(fn, tuple(item), kwargs, timeout_s) for item in items]
    scorer = _ForkedScorer(fn)
    try:
        return [scorer.score(tuple(item), kwargs, timeout_s) for item in items]
    finally:
        scorer.close()
