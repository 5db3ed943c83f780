"""The training command every remote target runs: ``python -m rlpost.train`` with the
user's overrides, plus the keys a launcher must pin.

Pinning ``output_dir`` to the value resolved at launch time matters: the default
``runs/${now:...}`` would otherwise resolve again on the cluster, and a requeued or
restarted job would start a fresh directory instead of resuming its own.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence


def override_key(override: str) -> str:
    """``+trainer.lr=1`` -> ``trainer.lr``; ``~eval`` -> ``eval``."""
    return override.lstrip("+~").split("=", 1)[0]


def pin(overrides: Sequence[str], **values: str) -> list[str]:
    """``overrides`` with each key in ``values`` set to that value (dotted keys are
    written with ``__``: ``ray__address="auto"``). Earlier settings of a pinned key are
    dropped rather than overridden twice, so the command reads unambiguously."""
    pinned = {key.replace("__", "."): value for key, value in values.items()}
    kept = [o for o in overrides if override_key(o) not in pinned]
    return kept + [f"{key}={value}" for key, value in pinned.items()]


def drop(overrides: Sequence[str], *keys: str) -> list[str]:
    """``overrides`` without any that set one of ``keys``."""
    return [o for o in overrides if override_key(o) not in keys]


def train_argv(overrides: Sequence[str], python: str = "python") -> list[str]:
    return [python, "-m", "rlpost.train", *overrides]


def shell_line(argv: Sequence[str]) -> str:
    return shlex.join(argv)
