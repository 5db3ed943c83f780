"""The filter's driver side: prepare the prompts, run the Ray pipeline
(``rlpost.workers.filter_pipeline``) for the shards not yet written, write the output.

Separate from ``rlpost.data.filter`` (the per-batch sampling and scoring the pipeline's
workers run) so that the Ray layer imports the batch functions without importing back
the driver that starts it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rlpost.config.schema import RunConfig, parse_band
from rlpost.data.filter import fingerprint, prepare_prompts
from rlpost.errors import ConfigError, WorkerError


def run_filter(cfg: RunConfig) -> dict:
    """Steps 1-3 (module docstring); returns the report written to ``report.json``."""
    from rlpost.data.filter_output import FilterOutput
    from rlpost.models.loading import load_tokenizer, resolve_model_path
    from rlpost.train import cache_root
    from rlpost.workers.cluster import start_cluster, stop_cluster

    if not cfg.filter.output:
        raise ConfigError("filter.output: name the folder to write, e.g. filter.output=filtered/gsm8k")
    band = parse_band(cfg.filter.keep)
    model_path = resolve_model_path(cfg.model.path)
    out = FilterOutput(Path(cfg.filter.output), fingerprint(cfg, model_path))
    prompts, counts = prepare_prompts(cfg, load_tokenizer(model_path), cache_root() / "data")
    print(f"rlpost filter: {counts.summary()}", flush=True)
    done = out.done_shards()
    pending = [p for p in prompts if p["shard"] not in done]
    shards = sorted({p["shard"] for p in prompts})
    print(f"rlpost filter: {len(shards)} shard(s) of up to {cfg.filter.shard_size} prompts; "
          f"{len(shards) - len({p['shard'] for p in pending})} already written in {out.root}", flush=True)
    started = time.perf_counter()
    if pending:
        from rlpost.workers.filter_pipeline import sample_and_score

        expected = {s: sum(p["shard"] == s for p in pending) for s in {p["shard"] for p in pending}}
        progress = _ShardProgress(out, expected, len(pending), started)
        if cfg.ray.address is None and cfg.ray.num_cpus is None:
            # A CPU slot for every sampler actor and scoring task: with fewer, the actors
            # would hold every slot and no sample would ever be scored.
            cfg.ray.num_cpus = max(os.cpu_count() or 1, cfg.filter.actors + cfg.reward.workers)
        cluster = start_cluster(cfg)
        try:
            sample_and_score(cfg, model_path, pending, progress.add)
        finally:
            stop_cluster(cluster)
        progress.check_complete()
    seconds = time.perf_counter() - started
    report = out.finish(band, counts, sampled=len(pending), seconds=seconds)
    print(f"rlpost filter: {report['summary']}", flush=True)
    return report


class _ShardProgress:
    """Collects scored rows per shard (they arrive in any order) and writes a shard as
    soon as all its prompts are in, printing the rate and an ETA then and every 30 s."""

    def __init__(self, out, expected: dict[int, int], total: int, started: float):
        self.out, self.expected, self.total, self.started = out, expected, total, started
        self.rows: dict[int, list[dict]] = {s: [] for s in expected}
        self.scored = 0
        self.printed, self.every_s = started, 30.0  # a progress line at least this often while rows arrive
        self.first = 0.0  # when the first scored row arrived

    def add(self, row: dict) -> None:
        shard = int(row["shard"])
        self.rows[shard].append(row)
        self.scored += 1
        self.first = self.first or time.perf_counter()
        if len(self.rows[shard]) == self.expected[shard]:
            self.out.write_shard(shard, self.rows.pop(shard))
            self._print(f"shard {shard} written; ")
        elif time.perf_counter() - self.printed >= self.every_s:
            self._print("")

    def _print(self, what: str) -> None:
        now = time.perf_counter()
        rate = self.scored / max(now - self.started, 1e-9)
        # The ETA from the rate since the first scored row: start-up (model loads) is over by then.
        steady = (self.scored - 1) / (now - self.first) if self.scored > 1 and now > self.first else rate
        eta = f"ETA {(self.total - self.scored) / steady:.0f} s" if steady > 0 else "ETA unknown"
        print(f"rlpost filter: {what}{self.scored}/{self.total} prompts, {rate:.2f} prompts/s, {eta}", flush=True)
        self.printed = now

    def check_complete(self) -> None:
        if self.rows:
            missing = {s: self.expected[s] - len(r) for s, r in self.rows.items()}
            raise WorkerError(f"the pipeline ended with prompts missing from shards {missing}")
