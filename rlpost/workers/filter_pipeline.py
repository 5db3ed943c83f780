"""The Ray side of the difficulty filter (``rlpost.data.filter``): a Ray Data stream of
prompts through an actor pool of rollout engines, then reward tasks.

    from_items(engine batches) -> map_batches(sampler actors, ActorPoolStrategy(size=filter.actors))
                        -> map_batches(score_rows tasks, TaskPoolStrategy(size=reward.workers))
                        -> iter_rows() on the driver

Each sampler actor holds one engine (``rollout.engine``: hf or vllm) for its whole
life, asks Ray for ``rollout.gpus_per_replica`` GPUs (``auto``: one when the cluster
has any) and lands on any node with room, so the pool spreads over the cluster.
Scoring is a separate CPU stage so a slow reward function never holds an engine
(the inference-on-accelerators, transform-on-CPUs split Ray Data is built for). Ray
Data streams: prompts enter the pool as actors free up, and scored rows reach the
driver while later batches are still sampling; its progress bars show rows/s.
The driver, not Ray Data, writes the output, so it lands on the driver's disk even
on a cluster without a shared filesystem.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import pyarrow as pa
import ray
import ray.data

from rlpost.config.schema import RewardConfig, RunConfig
from rlpost.data.filter import PromptSampler, score_rows
from rlpost.engines import resolve_rollout_engine
from rlpost.workers.cluster import quiet_actor_logs
from rlpost.workers.placement import actor_device, resolve_placement


class _SamplerActor:
    """The Ray Data UDF class: one ``PromptSampler`` per actor, on the actor's device.
    Each input row is one whole engine batch (``batch``, its prompts as JSON), so Ray
    Data's own batching can never regroup prompts and change what a seed samples."""

    def __init__(self, cfg: RunConfig, model_path: str):
        quiet_actor_logs()
        # Every actor gets the same engine seed: sampling is seeded per batch
        # (rlpost.data.filter.batch_seed), whichever actor takes the batch.
        self.sampler = PromptSampler(cfg, model_path, device=actor_device("filter sampler"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [row for item in batch.to_pylist() for row in self.sampler(json.loads(item["prompts"]))]
        return pa.Table.from_pylist(rows)


def _score(batch: pa.Table, reward: RewardConfig) -> pa.Table:
    return pa.Table.from_pylist(score_rows(batch.to_pylist(), reward))


def sample_and_score(cfg: RunConfig, model_path: str, prompts: list[dict], on_row: Callable[[dict], None]) -> None:
    """Run the stream over ``prompts`` (``rlpost.data.filter.prepare_prompts`` rows) on
    the connected cluster, calling ``on_row`` with each scored row as it arrives."""
    resolve_placement(cfg)  # rollout.gpus_per_replica auto -> 0 or 1 from the cluster
    # auto -> vllm or hf, decided once here as in rlpost.train, so every actor runs the same engine.
    cfg.rollout.engine = resolve_rollout_engine(cfg.rollout.engine, model_path, gpu=bool(cfg.rollout.gpus_per_replica))
    print(f"rlpost filter: {cfg.filter.actors} sampler actor(s), engine {cfg.rollout.engine}, "
          f"{cfg.rollout.gpus_per_replica} GPU each; {cfg.reward.workers} scoring task(s) at a time", flush=True)
    f = cfg.filter
    groups: dict[int, list[dict]] = {}
    for prompt in prompts:
        groups.setdefault(prompt["batch"], []).append(prompt)
    items = [{"batch": b, "prompts": json.dumps(group)} for b, group in sorted(groups.items())]
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    gpus = float(cfg.rollout.gpus_per_replica or 0) or None  # a number after resolve_placement
    ds = ds.map_batches(_SamplerActor, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=f.actors),
                        fn_constructor_kwargs={"cfg": cfg, "model_path": model_path},
                        num_cpus=1, num_gpus=gpus,
                        resources=cfg.rollout.resources)
    ds = ds.map_batches(functools.partial(_score, reward=cfg.reward), batch_size=f.batch_size,
                        batch_format="pyarrow", compute=ray.data.TaskPoolStrategy(size=cfg.reward.workers),
                        num_cpus=1)
    for row in ds.iter_rows():
        on_row(row)
