"""Difficulty-filter throughput (``python -m rlpost.data filter``): prompts/s with 1 and 2
rollout actors in the Ray Data pool, same prompts, same settings, runs interleaved.

    .venv/bin/python scripts/bench_filter.py                         # tiny model, HF engine
    .venv/bin/python scripts/bench_filter.py --prompts 128 --k 8 --engine vllm --actors 1,2

Each run is a fresh ``run_filter`` into its own folder (so nothing is reused), on one
Ray instance started here with a CPU slot for every actor and reward task. prompts/s is
the prompts sampled and scored over the pipeline's wall time, actor start-up (model
load) included: what a user waits for. ``--repeats`` interleaves the actor counts
(1, 2, 1, 2, ...) so a change in the machine's load hits both alike; the median is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--engine", default="hf")
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="builtin:tiny-math")
    args = parser.parse_args()

    import torch

    from rlpost.config.load import load_config
    from rlpost.data.filter_run import run_filter
    from rlpost.workers.cluster import start_cluster, stop_cluster

    torch.set_num_threads(1)
    actor_counts = [int(a) for a in args.actors.split(",")]
    base = ["+recipe=grpo_math", f"model.path={args.model}", f"rollout.engine={args.engine}", "reward.workers=1",
            f"filter.k={args.k}", f"filter.limit={args.prompts}", f"filter.batch_size={args.batch_size}",
            f"rollout.max_new_tokens={args.max_new_tokens}"]
    started = start_cluster(load_config([*base, f"ray.num_cpus={max(actor_counts) + 1}"]))
    rates: dict[int, list[float]] = {a: [] for a in actor_counts}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                for actors in actor_counts:
                    out = os.path.join(tmp, f"a{actors}-r{repeat}")
                    report = run_filter(load_config([*base, f"filter.actors={actors}", f"filter.output={out}"]))
                    rates[actors].append(report["prompts_per_s"])
                    print(f"bench_filter: actors={actors} repeat={repeat}: {report['prompts_per_s']:.3f} prompts/s "
                          f"({report['seconds']:.1f} s)", flush=True)
    finally:
        stop_cluster(started)
    print(f"\n{args.prompts} prompts x k={args.k}, <= {args.max_new_tokens} new tokens, engine {args.engine}, "
          f"{args.model}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for actors, values in rates.items():
        print(f"actors={actors}: median {statistics.median(values):.3f} prompts/s over {values}")


if __name__ == "__main__":
    main()
