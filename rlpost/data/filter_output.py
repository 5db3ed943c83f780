"""The difficulty filter's output folder (``filter.output``)::

    manifest.json              what decided the pass rates (model, data, reward, sampling)
    shards/part-00000.parquet  every scored prompt of shard 0, in input order
    kept.parquet               the prompts with pass_rate in filter.keep, in input order
    report.json                counts: read, dropped (and why), scored, kept, pass-rate histogram

A shard file appears only when complete (written to a temporary name, then renamed),
so after an interruption a rerun trusts every ``part-*.parquet`` it finds and samples
the rest. A rerun with other settings than ``manifest.json`` records stops with an
error instead of mixing pass rates of two models (``filter.keep`` may change freely).

Rows of ``kept.parquet`` and the shards are what ``data.source=files`` reads: ``prompt``
(the chat messages, a list of {role, content}), ``answer``, the source row's scalar
fields, and ``uid`` (source row), ``pass_rate``, ``mean_reward``, ``mean_length``,
``num_scored``, which training passes to the reward function as metadata.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rlpost.errors import ConfigError

STATS = ("uid", "pass_rate", "mean_reward", "mean_length", "num_scored")


class FilterOutput:
    def __init__(self, root: Path, fingerprint: dict):
        self.root = Path(root).resolve()
        self.shards = self.root / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        manifest = self.root / "manifest.json"
        recorded = json.loads(manifest.read_text()) if manifest.is_file() else None
        fingerprint = json.loads(json.dumps(fingerprint))  # the form it takes on disk
        if recorded is not None and recorded != fingerprint and self.done_shards():
            changed = sorted(k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k))
            raise ConfigError(
                f"filter.output={str(root)!r} holds shards made with other settings ({', '.join(changed)} differ); "
                f"name a new filter.output, or delete that folder to start over")
        manifest.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))

    def shard_path(self, shard: int) -> Path:
        return self.shards / f"part-{shard:05d}.parquet"

    def done_shards(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.shards.glob("part-*.parquet")}

    def write_shard(self, shard: int, rows: list[dict]) -> None:
        rows = sorted(rows, key=lambda r: int(r["position"]))
        table = output_table([output_row(r) for r in rows])
        tmp = self.shard_path(shard).with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.shard_path(shard))  # atomic: a shard file is always complete

    def finish(self, band: tuple[float, float], counts, sampled: int, seconds: float) -> dict:
        """Concatenate the shards, write ``kept.parquet`` and ``report.json``."""
        tables = [pq.read_table(self.shard_path(s)) for s in sorted(self.done_shards())]
        rows = [row for t in tables for row in t.to_pylist()]
        kept = [r for r in rows if in_band(r["pass_rate"], band)]
        tmp = self.root / "kept.parquet.tmp"
        if kept:
            pq.write_table(output_table(kept), tmp)
        else:  # an empty band still gives a readable file with the shards' columns
            pq.write_table(tables[0].schema.empty_table() if tables else pa.table({}), tmp)
        os.replace(tmp, self.root / "kept.parquet")
        rates = [r["pass_rate"] for r in rows if r["pass_rate"] is not None]
        histogram = {f"{i / 10:.1f}-{(i + 1) / 10:.1f}": sum(min(int(x * 10), 9) == i for x in rates) for i in range(10)}
        report = {
            "read": vars(counts), "scored": len(rows), "unscored": len(rows) - len(rates),
            "sampled_now": sampled, "seconds": round(seconds, 2),
            "prompts_per_s": round(sampled / seconds, 3) if sampled and seconds > 0 else None,
            "keep": list(band), "kept": len(kept), "pass_rate_histogram": histogram,
            "mean_pass_rate": sum(rates) / len(rates) if rates else None,
        }
        report["summary"] = (f"{len(rows)} prompts scored ({sampled} sampled now), {len(kept)} with pass rate in "
                             f"[{band[0]:g}, {band[1]:g}] -> {self.root / 'kept.parquet'}")
        (self.root / "report.json").write_text(json.dumps(report, indent=1))
        return report


def in_band(pass_rate: float | None, band: tuple[float, float]) -> bool:
    """Both ends included; an unscored prompt (None) is never kept."""
    return pass_rate is not None and not math.isnan(pass_rate) and band[0] <= pass_rate <= band[1]


def output_row(row: dict) -> dict:
    """A scored pipeline row as training reads it (module docstring)."""
    out = {"prompt": json.loads(row["messages"]), "answer": row["answer"]}
    for key, value in json.loads(row["metadata"]).items():
        if key not in out and key not in STATS:
            out[key] = value
    out.update({k: row[k] for k in STATS})
    return out


def output_table(rows: list[dict]) -> pa.Table:
    """Rows as a table; a metadata column whose values mix types (possible from jsonl)
    is written as strings rather than failing the shard."""
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        keys = {k for r in rows for k in r}
        fixed: dict[str, Callable[[Any], Any] | None] = dict.fromkeys(keys)
        for key in keys:
            try:
                pa.array([r.get(key) for r in rows])
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                fixed[key] = str
        return pa.Table.from_pylist([{k: v if (conv := fixed.get(k)) is None or v is None else conv(v)
                                      for k, v in r.items()} for r in rows])
