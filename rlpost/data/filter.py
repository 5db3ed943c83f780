"""Difficulty filtering: the pass rate of every prompt under the current model, and the
prompts whose pass rate lies in a band (``filter.keep``, e.g. 0.1:0.9).

Why: a GRPO group whose k samples all pass, or all fail, has zero advantage and
teaches nothing; filtering to prompts the model sometimes solves spends every step
on signal. The pass rate is measured on the *raw* correctness score
(``rlpost.rollout.evaluation.score_of``: the ``accuracy`` component when the reward reports
one, else the total, > 0 counts as a pass), never on a shaped reward.

The pipeline (``run_filter``):

1. read the ``data`` split through the loader's own row path (``raw_rows`` /
   ``parse_row``: the same sources, ``row_fn``, malformed-row counting as training),
   template each prompt, drop over-long prompts and exact duplicates (same messages,
   first one kept), all counted. This runs on the driver because dropping duplicates
   needs every prompt seen; it keeps only prompt text and ids.
2. stream the prompts through Ray Data (``rlpost.workers.filter_pipeline``): an actor
   pool of rollout engines samples ``filter.k`` completions per prompt
   (``PromptSampler``, one engine per actor, on every node with room), then Ray tasks
   score them with ``reward.fn`` (``score_rows``).
3. the driver collects the scored prompts per output shard (``filter.shard_size``
   prompts in input order) and writes each finished shard (``rlpost.data.filter_output``).

Resume: a finished shard is a file, written atomically; a rerun with the same
settings samples only the shards that are missing, and a rerun that changes only
``filter.keep`` samples nothing and rewrites ``kept.parquet``.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

from rlpost.config.schema import RewardConfig, RunConfig
from rlpost.data.dataset import parse_row, raw_rows, template_prompt, with_system_prompt
from rlpost.data.sources import load_row_fn
from rlpost.types import SamplingParams


@dataclass
class ReadCounts:
    loaded: int = 0  # rows read from the source
    malformed: int = 0
    too_long: int = 0  # over data.max_prompt_tokens
    duplicates: int = 0  # same prompt messages as an earlier row
    prompts: int = 0  # left to score (at most filter.limit)
    first_error: str | None = None  # the first data.row_fn failure

    def summary(self) -> str:
        error = f"; first row_fn error: {self.first_error}" if self.first_error else ""
        return (f"read {self.loaded} rows: {self.malformed} malformed, {self.too_long} over max_prompt_tokens, "
                f"{self.duplicates} duplicates dropped; {self.prompts} prompts to score{error}")


def prepare_prompts(cfg: RunConfig, tokenizer, data_dir: Path) -> tuple[list[dict], ReadCounts]:
    """Step 1: one row per distinct prompt, in source order, with its output shard.

    Row: ``uid``, ``position`` (index among the prompts), ``shard``, ``batch`` (the engine
    call it is sampled in: ``filter.batch_size`` prompts of one shard), ``messages`` (JSON,
    before ``data.system_prompt``, as training reads them back), ``question``,
    ``answer``, ``metadata`` (JSON), ``prompt_ids`` (templated, system prompt included).
    """
    split = cfg.filter.split
    # filter.split is train or val (FilterConfig.check)
    rows, prompt_key, answer_key = raw_rows(cfg.data, cast(Literal["train", "val"], split), cfg.seed, data_dir)
    row_fn = load_row_fn(cfg.data.row_fn)
    counts, seen, out = ReadCounts(), set[str](), list[dict]()
    batches_per_shard = -(-cfg.filter.shard_size // cfg.filter.batch_size)
    for index, row in enumerate(rows):
        if cfg.filter.limit and len(out) >= cfg.filter.limit:
            break
        counts.loaded += 1
        parsed, error = parse_row(row, prompt_key, answer_key, row_fn)
        if parsed is None:
            counts.malformed += 1
            counts.first_error = counts.first_error or error
            continue
        messages = with_system_prompt(parsed.messages, cfg.data.system_prompt)
        prompt_ids = template_prompt(tokenizer, messages)
        if len(prompt_ids) > cfg.data.max_prompt_tokens:
            counts.too_long += 1
            continue
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            counts.duplicates += 1
            continue
        seen.add(key)
        position = len(out)
        shard, in_shard = divmod(position, cfg.filter.shard_size)
        out.append({"uid": f"{split}-{index}", "position": position, "shard": shard,
                    "batch": shard * batches_per_shard + in_shard // cfg.filter.batch_size,
                    "messages": json.dumps(parsed.messages), "question": parsed.question, "answer": parsed.answer,
                    "metadata": json.dumps(parsed.metadata), "prompt_ids": prompt_ids})
    counts.prompts = len(out)
    return out, counts


def sampling_params(cfg: RunConfig) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(n=cfg.filter.k, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens, stop=tuple(r.stop))


def batch_seed(seed: int, uids: list[str]) -> int:
    """A sampling seed from the run seed and the batch's prompts, so the same batch
    samples the same completions whichever actor gets it. Batches are fixed at step 1
    (the ``batch`` column, never spanning shards), so a shard sampled again after an
    interruption gets the completions an uninterrupted run would have had."""
    return zlib.crc32(f"{seed}|{'|'.join(uids)}".encode()) & 0x7FFFFFFF


class PromptSampler:
    """Step 2a, one per actor: ``filter.k`` completions for each prompt of a batch.
    Rows in, rows out (``prompt_ids`` replaced by ``completions`` and ``lengths``, the
    completion texts and their token counts)."""

    def __init__(self, cfg: RunConfig, model_path: str, device: Any = "cpu", replica: int = 0):
        import torch

        from rlpost.engines import make_rollout_engine

        threads = cfg.rollout.threads or 1
        torch.set_num_threads(threads)
        self.engine = make_rollout_engine(cfg, model_path, seed=cfg.seed + 1000 * replica, device=device,
                                          num_threads=threads)
        self.params, self.seed = sampling_params(cfg), cfg.seed

    def __call__(self, rows: list[dict]) -> list[dict]:
        if not rows:
            return []
        params = replace(self.params, seed=batch_seed(self.seed, [r["uid"] for r in rows]))
        groups = self.engine.generate([[int(t) for t in r["prompt_ids"]] for r in rows], params)
        return [{**{k: v for k, v in row.items() if k != "prompt_ids"},
                 "completions": [c.text for c in group], "lengths": [len(c.token_ids) for c in group]}
                for row, group in zip(rows, groups)]


def score_rows(rows: list[dict], reward: RewardConfig) -> list[dict]:
    """Step 2b: each prompt's completions scored with ``reward.fn`` (per-sample
    isolation and timeout as in training, ``rlpost.rewards.score_batch``). Adds
    ``pass_rate`` (share of scored samples with ``score_of`` > 0; None when no sample
    could be scored), ``mean_reward``, ``mean_length`` (completion tokens) and
    ``num_scored``; drops the completion texts."""
    from rlpost.rollout.evaluation import score_of
    from rlpost.rewards import load_reward_fn, score_batch

    fn = load_reward_fn(reward.fn, kwargs=reward.kwargs)
    items = [(r["question"], text, r["answer"], json.loads(r["metadata"])) for r in rows for text in r["completions"]]
    rewards = iter(score_batch(fn, items, reward.timeout_s, reward.kwargs))
    out = []
    for row in rows:
        scored = [x for x in (next(rewards) for _ in row["completions"]) if x.error is None]
        lengths = list(row["lengths"])
        n = len(scored)
        out.append({**{k: v for k, v in row.items() if k not in ("completions", "lengths")},
                    "pass_rate": sum(score_of(x) > 0 for x in scored) / n if n else None,
                    "mean_reward": sum(x.total for x in scored) / n if n else None,
                    "mean_length": sum(lengths) / len(lengths) if lengths else 0.0,
                    "num_scored": n})
    return out


def fingerprint(cfg: RunConfig, model_path: str) -> dict:
    """What decides the pass rates in an output folder: a rerun must match it to reuse
    shards. ``filter.keep`` is not part of it (it only selects from the shards)."""
    from rlpost.config.convert import to_dict

    f = cfg.filter
    return {"model": model_path, "data": to_dict(cfg.data), "reward": {"fn": cfg.reward.fn, "kwargs": cfg.reward.kwargs},
            "sampling": to_dict(sampling_params(cfg)), "engine": cfg.rollout.engine, "seed": cfg.seed,
            "split": f.split, "shard_size": f.shard_size, "limit": f.limit}
