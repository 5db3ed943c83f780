"""What the OpenAI-compatible gateway adds per call: the same chat requests sent through
it with the real ``openai`` client, next to the same prompts handed to the rollout group
directly, side by side in one process.

    .venv/bin/python scripts/bench_gateway.py                          # tiny-math, HF engine
    .venv/bin/python scripts/bench_gateway.py --requests 64 --concurrency 4 --max-tokens 32

Paths (each one call = one prompt, one completion, greedy, so every path samples the
same tokens and only the path differs):

- ``direct``: ``LocalRolloutGroup.generate([prompt_ids], params, replica=0)`` with the
  prompt already templated and encoded (the chat renderer, outside the timing), through
  the same ``ReplicaBatcher`` the gateway uses, so at any concurrency both paths batch
  alike and the difference is the gateway's HTTP, JSON, templating and parsing;
- ``gateway``: ``client.chat.completions.create(messages=...)`` against the stateless
  ``/v1/chat/completions`` (HTTP, JSON, templating, encoding, reply parsing);
- ``session``: the same request on a fresh gateway session per call, recorded for
  training (``/sessions/<id>/v1``), the path ``env.agent`` uses (same client connection
  pool; sessions are never closed during the run, so their records accumulate).

``--concurrency`` threads send calls at once on every path. The paths alternate over
``--rounds`` rounds, so load on a shared machine hits each alike; the report gives, per
path, requests/s and mean latency per call (median over rounds), and per gateway path
the ratio of its requests/s to direct and the latency it adds (ms per call).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny-math", help="a builtin: model or a local HF folder")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    p.add_argument("--requests", type=int, default=32, help="calls per path per round")
    p.add_argument("--concurrency", type=int, default=1, help="threads sending calls at once")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every call")
    p.add_argument("--rounds", type=int, default=3, help="rounds, paths alternating within each")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    return p.parse_args(argv)


def make_engine(args, model_path: str):
    if args.engine == "vllm":
        from rlpost.engines.vllm_rollout import VLLMRolloutEngine

        return VLLMRolloutEngine(model_path, max_model_len=512, kv_cache_gb=0.25, num_threads=args.threads)
    from rlpost.engines.hf_rollout import HFRolloutEngine

    return HFRolloutEngine(model_path, num_threads=args.threads)


def timed(calls: list, concurrency: int) -> tuple[float, float]:
    """(requests/s, mean seconds per call) of running every zero-argument call."""
    latencies: list[float] = []

    def one(call):
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, calls))
    wall = time.perf_counter() - start
    return len(calls) / wall, statistics.fmean(latencies)


def main(argv=None) -> None:
    args = parse_args(argv)
    import openai
    import torch

    from rlpost.data.math_gen import generate_problems
    from rlpost.envs.chat import ChatRenderer
    from rlpost.gateway.batching import ReplicaBatcher
    from rlpost.gateway import GatewayConfig, GatewayServer
    from rlpost.local import LocalRolloutGroup
    from rlpost.models.loading import load_tokenizer, resolve_model_path
    from rlpost.types import SamplingParams

    torch.set_num_threads(args.threads)
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    renderer = ChatRenderer(tokenizer)
    group = LocalRolloutGroup([make_engine(args, model_path)])
    problems = generate_problems(args.requests, 3, 0, "bench-gateway", heldout=False)
    conversations = [[{"role": "user", "content": p.question}] for p in problems]
    prompt_ids = [renderer.opening_ids(m, []) for m in conversations]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=args.max_tokens)
    batcher = ReplicaBatcher(lambda prompts, p: group.generate(prompts, p, replica=0))

    def direct(ids):
        return batcher.generate([ids], params)

    results: dict[str, list[tuple[float, float]]] = {"direct": [], "gateway": [], "session": []}
    with GatewayServer(group, tokenizer, GatewayConfig(max_context_tokens=4096)) as gw:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)

        def chat(c, messages):
            return c.chat.completions.create(model="policy", messages=messages, max_tokens=args.max_tokens,
                                             temperature=0.0)

        def in_session(messages):
            _, url = gw.new_session()
            # The same HTTP connection pool, another base URL: building a client per call
            # would time the openai package's set-up, not the gateway.
            return chat(client.with_options(base_url=url), messages)

        paths = {
            "direct": [lambda ids=ids: direct(ids) for ids in prompt_ids],
            "gateway": [lambda m=m: chat(client, m) for m in conversations],
            "session": [lambda m=m: in_session(m) for m in conversations],
        }
        for calls in paths.values():  # warm-up: one call each
            calls[0]()
        for _ in range(args.rounds):
            for name, calls in paths.items():
                results[name].append(timed(calls, args.concurrency))
        client.close()

    print(f"model {args.model}, engine {args.engine}, {args.requests} calls x {args.rounds} rounds, "
          f"concurrency {args.concurrency}, max_tokens {args.max_tokens}, greedy; median over rounds")
    base_rps = statistics.median(r for r, _ in results["direct"])
    base_lat = statistics.median(lat for _, lat in results["direct"])
    print(f"{'path':<8} {'req/s':>8} {'ms/call':>9} {'req/s vs direct':>16} {'added ms/call':>14}")
    for name, rows in results.items():
        rps, lat = statistics.median(r for r, _ in rows), statistics.median(lat for _, lat in rows)
        print(f"{name:<8} {rps:8.1f} {lat * 1e3:9.2f} {rps / base_rps:15.2f}x {(lat - base_lat) * 1e3:14.2f}")


if __name__ == "__main__":
    main()
