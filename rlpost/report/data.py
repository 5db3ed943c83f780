"""Read a run directory: ``metrics.jsonl``, ``config.yaml`` and ``samples.jsonl``.

Works on a run that is still being written: a partial last line (the writer is in
the middle of appending it) or any other unreadable line is skipped and counted,
never fatal. A step logged twice (a resumed run that did not truncate) keeps its
last record, as a reader of the run would expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rlpost.errors import RlpostError
from rlpost.utils.jsonl import iter_jsonl


class ReportError(RlpostError):
    """The run directory cannot be reported on (no metrics file)."""


@dataclass(frozen=True)
class Series:
    """One metric over steps; ``values[i]`` was logged at ``steps[i]``. Non-finite
    values (written to metrics.jsonl as the strings "nan"/"inf") are ``nan``."""

    key: str
    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass
class RunData:
    output_dir: Path
    records: list[dict]  # one per step, sorted by step
    config: dict | None = None
    samples: list[dict] = field(default_factory=list)
    skipped_lines: int = 0  # unreadable metrics/samples lines (e.g. a half-written last line)

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for record in self.records:
            for key, value in record.items():
                if key != "step" and _as_number(value) is not None:
                    seen.setdefault(key, None)
        return list(seen)

    def series(self, key: str) -> Series | None:
        """Steps at which ``key`` was logged and its values; None when never logged."""
        points = [(r["step"], _as_number(r[key])) for r in self.records if key in r]
        points = [(s, v) for s, v in points if v is not None]
        if not points:
            return None
        return Series(key, tuple(s for s, _ in points), tuple(v for _, v in points))


def _as_number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Objects of a JSON-lines file and the number of lines that could not be read."""
    rows = list(iter_jsonl(path))
    good = [row for row in rows if row is not None]
    return good, len(rows) - len(good)


def load_run(output_dir: str | Path, metrics_file: str = "metrics.jsonl",
             samples_file: str = "samples.jsonl") -> RunData:
    output_dir = Path(output_dir)
    metrics_path = output_dir / metrics_file
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path} does not exist: pass a run's output_dir "
                          f"(trained with the jsonl logger, logger=[console,jsonl])")
    rows, bad = read_jsonl(metrics_path)
    by_step: dict[int, dict] = {}
    for row in rows:
        if isinstance(row.get("step"), int):
            by_step[row["step"]] = row
        else:
            bad += 1
    samples: list[dict] = []
    if (output_dir / samples_file).is_file():
        samples, bad_samples = read_jsonl(output_dir / samples_file)
        bad += bad_samples
    return RunData(output_dir, [by_step[s] for s in sorted(by_step)], _read_config(output_dir / "config.yaml"),
                   samples, bad)


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return config if isinstance(config, dict) else None


def finite_or_none(value: float) -> float | None:
    """For JSON, which has no NaN: non-finite values become null."""
    return value if math.isfinite(value) else None
