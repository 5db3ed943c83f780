"""Weight sync throughput: trainer rank 0 -> rollout replicas over the sync group.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_weight_sync.py
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_weight_sync.py --params-m 10 50 200 --receivers 1 2 --bucket-mb 64

What is timed: one ``WeightSender.send`` to ``--receivers`` ``WeightReceiver`` processes,
each consuming the stream into preallocated model-shaped tensors (``copy_``, as an
engine's in-place load does), from the handshake to the last receiver done; median of
``--repeats`` syncs after one warm-up. The weights are a Qwen2-shaped set of fp32
tensors (embedding, per-layer attention/MLP matrices, norms) scaled to about
``--params-m`` million parameters, so bucket packing sees realistic tensor sizes.
GB/s is model bytes / sync time (each receiver gets all of them: a broadcast).
Transport is gloo over loopback on this CPU; on GPUs the same code uses NCCL.
What it does not include: gathering FSDP shards on the trainer
(``named_full_weights``) and the rollout engine's own reload (vLLM repacks CPU weights).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlpost.weight_sync import WeightReceiver, WeightSender, make_plan  # noqa: E402


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qwen2_like_shapes(params_m: float) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of a Qwen2-style model with about ``params_m`` M parameters."""
    hidden = 64
    while True:  # grow width and depth together until the count reaches the target
        layers, vocab = max(2, hidden // 64), 32000
        shapes = [("model.embed_tokens.weight", (vocab, hidden))]
        for i in range(layers):
            p = f"model.layers.{i}."
            shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (hidden // 4, hidden)),
                       (p + "self_attn.v_proj.weight", (hidden // 4, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                       (p + "mlp.gate_proj.weight", (3 * hidden, hidden)), (p + "mlp.up_proj.weight", (3 * hidden, hidden)),
                       (p + "mlp.down_proj.weight", (hidden, 3 * hidden)),
                       (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
        total = sum(torch.Size(s).numel() for _, s in shapes)
        if total >= params_m * 1e6 or hidden > 8192:
            return [(n, s, torch.float32) for n, s in shapes]
        hidden += 64


def _receiver(rank: int, world: int, port: int, shapes, bucket_mb: float, syncs: int, ready) -> None:
    torch.set_num_threads(1)
    model = {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in shapes}
    plan = make_plan(shapes, bucket_mb)
    with WeightReceiver("127.0.0.1", port, rank, world, timeout_s=600) as receiver:
        ready.put(rank)
        for version in range(1, syncs + 1):
            for name, tensor in receiver.receive(plan, version):
                model[name].copy_(tensor)


def bench(params_m: float, receivers: int, bucket_mb: float, repeats: int) -> dict:
    shapes = qwen2_like_shapes(params_m)
    weights = {name: torch.randn(shape, dtype=dtype) for name, shape, dtype in shapes}
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    plan = make_plan(shapes, bucket_mb)
    port, world, syncs = free_loopback_port(), receivers + 1, repeats + 1
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(r, world, port, shapes, bucket_mb, syncs, ready))
             for r in range(1, world)]
    for p in procs:
        p.start()
    times = []
    try:
        with WeightSender("127.0.0.1", port, world, timeout_s=600, bucket_mb=bucket_mb) as sender:
            for _ in range(receivers):
                ready.get(timeout=120)
            for version in range(1, syncs + 1):
                t0 = time.perf_counter()
                sender.send(iter(weights.items()), plan, version)
                # the handshake of the next sync (or the join below) waits for the receivers;
                # the last bucket's broadcast returns only once every receiver has it.
                times.append(time.perf_counter() - t0)
    finally:
        for p in procs:
            p.join(timeout=120)
            if p.is_alive():
                p.kill()
    t = statistics.median(times[1:])
    return {"params_m": sum(torch.Size(s).numel() for _, s, _ in shapes) / 1e6, "gb": nbytes / 1e9,
            "receivers": receivers, "bucket_mb": bucket_mb, "buckets": len(plan.buckets),
            "sync_s": t, "gb_per_s": nbytes / 1e9 / t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-m", type=float, nargs="+", default=[10, 50, 200])
    parser.add_argument("--receivers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| params (M) | size (GB fp32) | receivers | bucket MB | buckets | sync s | GB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for params_m in args.params_m:
        for receivers in args.receivers:
            for bucket_mb in args.bucket_mb:
                r = bench(params_m, receivers, bucket_mb, args.repeats)
                print(f"| {r['params_m']:.1f} | {r['gb']:.3f} | {r['receivers']} | {r['bucket_mb']:g} | "
                      f"{r['buckets']} | {r['sync_s']:.3f} | {r['gb_per_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
