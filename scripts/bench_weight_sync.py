"""Weight sync throughput beside the bare wire: trainer rank 0 -> rollout replicas.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_weight_sync.py
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_weight_sync.py --params-m 50 200 --receivers 1 --bucket-mb 64

For each size, one invocation times these over the *same* process group (the
sync group rlpost builds: same processes, same gloo/NCCL transport, same sockets,
same gloo worker threads), in a rotating order, ``--repeats`` rounds after one
warm-up round:

- **bare**: one ``broadcast`` of a single flat tensor holding the model's total
  bytes, from a preallocated tensor into preallocated tensors: the wire's speed
  for those bytes between those processes (no packing, no per-tensor work, one
  collective).
- **bare pipelined**: the same flat tensor as 16 MiB broadcasts, up to 8 in flight:
  what the wire gives a pipelined sender of large contiguous chunks (shown for
  reference; the target compares with **bare**).
- **rlpost dN** (one per ``--depth`` N; the shipped pipeline depth is 8, 2 was the
  depth before it): one ``WeightSender.send`` of a Qwen2-shaped set of tensors to
  ``--receivers`` ``WeightReceiver`` processes, each loading the stream into its
  own preallocated model-shaped tensors as an engine's in-place load does
  (``--load land``: it offers those tensors to the stream with ``load_into``, as
  ``HFRolloutEngine.update_weights`` does, and ``copy_``s whatever did not land
  there; ``--load copy``: it only ``copy_``s every yielded tensor, as an engine
  whose storage cannot take the wire format does), with at most N broadcasts in
  flight per rank. It includes everything a sync does: the version/layout
  handshake, packing small tensors, one broadcast per bucket.

Each timing runs from a barrier to a barrier (a one-element all-reduce after the
last receiver is done), so all include the same synchronisation. Reported: median
seconds, GB/s (model bytes / median time; each receiver gets all of them) and
rlpost/bare as the median over rounds of that round's bare time over its rlpost
time (pairs measured seconds apart, so a shared machine's drift cancels), and the
1-minute load average before and after.

The weights are fp32 tensors of a Qwen2-style model (embedding, per-layer
attention/MLP matrices, norms) scaled to about ``--params-m`` M parameters, so
bucket packing sees realistic tensor sizes. With ``--sender fsdp``
they come instead from a real one-rank FSDP2 ``FSDPEngine`` (a random Qwen2 of that
size, untied, saved to a temporary folder first) through ``named_full_weights()``,
as trainer rank 0 sends them: the sender's per-tensor gathering is then inside the
rlpost timing (the bare broadcast does not gather). ``--profile`` also
prints where the sender's time goes (cProfile, one sync). Not included: gathering
FSDP shards on several trainer ranks (the all-gathers of ``named_full_weights``
beyond one rank) and vLLM's own reload (it repacks CPU weights).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlpost.sync.transport import WeightReceiver, WeightSender, make_plan  # noqa: E402


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


class _FSDPSource:
    """Weights from a one-rank FSDP2 ``FSDPEngine``: what trainer rank 0 sends."""

    def __init__(self, params_m: float, folder: str):
        import torch.distributed as dist
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from rlpost.config.schema import ModelConfig
        from rlpost.engines.fsdp import FSDPEngine

        hidden = qwen2_like_shapes(params_m)[0][1][1]
        heads = hidden // 64
        config = Qwen2Config(vocab_size=32000, hidden_size=hidden, intermediate_size=3 * hidden,
                             num_hidden_layers=max(2, hidden // 64), num_attention_heads=heads,
                             num_key_value_heads=max(1, heads // 4), tie_word_embeddings=False)
        Qwen2ForCausalLM(config).save_pretrained(folder)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_loopback_port()}", rank=0, world_size=1)
        self.engine = FSDPEngine(folder, ModelConfig(path=folder), None, trainable=False)
        self.shapes = self.engine.named_weight_shapes()

    def weights(self):
        return self.engine.named_full_weights()

    @torch.no_grad()
    def set_checkable(self, version: int) -> None:
        for name, t in self.engine.model.state_dict().items():  # one rank: the local shard is the tensor
            t.to_local().copy_(_weight(name, t.shape, version))


class _PlainSource:
    """Weights as a dict of plain tensors."""

    def __init__(self, params_m: float):
        self.shapes = qwen2_like_shapes(params_m)
        self._weights = {name: torch.randn(shape, dtype=dtype) for name, shape, dtype in self.shapes}

    def weights(self):
        return iter(self._weights.items())

    def set_checkable(self, version: int) -> None:
        self._weights = {name: _weight(name, t.shape, version) for name, t in self._weights.items()}


def _barrier(endpoint) -> None:
    """A one-element all-reduce on the sync group itself (every rank leaves after all arrived)."""
    t = torch.zeros(1)
    endpoint._require().pg.allreduce([t]).wait()


def _bare(endpoint, flat: torch.Tensor) -> None:
    """The wire alone: one broadcast of one preallocated flat tensor, on the sync group's own pg."""
    endpoint._require().pg.broadcast(flat, 0).wait()


def _bare_pipelined(endpoint, flat: torch.Tensor) -> None:
    """The wire pipelined: the same flat bytes as 16 MiB broadcasts, up to 8 in flight."""
    pg, works = endpoint._require().pg, []
    for chunk in flat.split(16 * 2**20):
        if len(works) == 8:
            works.pop(0).wait()
        works.append(pg.broadcast(chunk, 0))
    for work in works:
        work.wait()


def _order(i: int, cases: list[str]) -> list[str]:
    """Round i's order: rotated by one each round, so drift hits every case alike."""
    k = i % len(cases)
    return cases[k:] + cases[:k]


def _cases(depths: list[int]) -> list[str]:
    return ["bare", "bare pipelined"] + [f"rlpost d{d}" for d in depths]


def _set_depth(endpoint, what: str) -> None:
    endpoint._depth = int(what.split("d")[-1])


def _receiver(rank: int, world: int, port: int, shapes, bucket_mb: float, alone_mb: float, rounds: int, load: str,
              depths: list[int], ready) -> None:
    torch.set_num_threads(1)
    model = {name: torch.zeros(shape, dtype=dtype) for name, shape, dtype in shapes}
    flat = torch.zeros(sum(t.numel() * t.element_size() for t in model.values()), dtype=torch.uint8)
    plan = make_plan(shapes, bucket_mb, alone_mb)
    with WeightReceiver("127.0.0.1", port, rank, world, timeout_s=600) as receiver:
        ready.put(rank)
        version = 0
        for i in range(rounds):
            for what in _order(i, _cases(depths)):
                _barrier(receiver)
                if what == "bare":
                    _bare(receiver, flat)
                elif what == "bare pipelined":
                    _bare_pipelined(receiver, flat)
                else:
                    version += 1
                    _set_depth(receiver, what)
                    stream = receiver.receive(plan, version)
                    if load == "land" and hasattr(stream, "load_into"):
                        stream.load_into(model)
                    for name, tensor in stream:
                        target = model[name]
                        if tensor.data_ptr() != target.data_ptr():
                            target.copy_(tensor)
                _barrier(receiver)
        # honesty check: the model tensors hold what the sender sent last
        ok = all(torch.equal(t, _weight(name, t.shape, rounds)) for name, t in model.items())
        ready.put(("check", rank, ok))


def _weight(name: str, shape, version: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{version}".encode()))  # same in every process
    return torch.rand(shape, generator=g)


def bench(source, receivers: int, bucket_mb: float, alone_mb: float, repeats: int, load: str,
          depths: list[int], profile: bool) -> dict:
    shapes = source.shapes
    nbytes = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, s, d in shapes)
    flat = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    plan = make_plan(shapes, bucket_mb, alone_mb)
    port, world, rounds = free_loopback_port(), receivers + 1, repeats + 1
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    procs = [ctx.Process(target=_receiver,
                         args=(r, world, port, shapes, bucket_mb, alone_mb, rounds, load, depths, ready))
             for r in range(1, world)]
    for p in procs:
        p.start()
    times: dict[str, list[float]] = {what: [] for what in _cases(depths)}
    checks = []
    load_before = os.getloadavg()[0]
    try:
        with WeightSender("127.0.0.1", port, world, timeout_s=600, bucket_mb=bucket_mb) as sender:
            for _ in range(receivers):
                ready.get(timeout=120)
            version = 0
            for i in range(rounds):
                if i == rounds - 1:  # the last round sends checkable weights
                    source.set_checkable(rounds)
                for what in _order(i, _cases(depths)):
                    _barrier(sender)
                    t0 = time.perf_counter()
                    if what == "bare":
                        _bare(sender, flat)
                    elif what == "bare pipelined":
                        _bare_pipelined(sender, flat)
                    else:
                        version += 1
                        _set_depth(sender, what)
                        if profile and i == 1:
                            import cProfile
                            import pstats

                            with cProfile.Profile() as prof:
                                sender.send(source.weights(), plan, version)
                            print(what)
                            pstats.Stats(prof).sort_stats("tottime").print_stats(8)
                        else:
                            sender.send(source.weights(), plan, version)
                    _barrier(sender)  # every receiver has loaded everything
                    times[what].append(time.perf_counter() - t0)
            for _ in range(receivers):
                checks.append(ready.get(timeout=120))
    finally:
        for p in procs:
            p.join(timeout=120)
            if p.is_alive():
                p.kill()
    if not all(ok for _, _, ok in checks):
        raise SystemExit(f"receivers did not end with the sent weights: {checks}")
    bare = times["bare"][1:]  # round 0 is the warm-up
    ours = {what: t[1:] for what, t in times.items() if what.startswith("rlpost")}
    piped = times["bare pipelined"][1:]
    return {"params_m": sum(torch.Size(s).numel() for _, s, _ in shapes) / 1e6, "gb": nbytes / 1e9,
            "receivers": receivers, "bucket_mb": bucket_mb, "alone_mb": alone_mb, "buckets": len(plan.buckets),
            "bare_s": statistics.median(bare), "load": (load_before, os.getloadavg()[0]),
            "piped_s": statistics.median(piped), "piped_ratio": statistics.median([b / p for b, p in zip(bare, piped)]),
            "sync_s": {what: statistics.median(t) for what, t in ours.items()},
            "ratio": {what: statistics.median([b / o for b, o in zip(bare, t)]) for what, t in ours.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-m", type=float, nargs="+", default=[50, 200])
    parser.add_argument("--receivers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[64])
    parser.add_argument("--alone-mb", type=float, nargs="+", default=[1.0],
                        help="tensors of at least this many MiB travel alone (make_plan's alone_mb)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--load", choices=("land", "copy"), default="land")
    parser.add_argument("--depth", type=int, nargs="+", default=[8, 2],
                        help="rlpost's most broadcasts in flight per rank, one measured case each (shipped: 8)")
    parser.add_argument("--sender", choices=("plain", "fsdp"), default="plain",
                        help="plain tensors, or a one-rank FSDP2 FSDPEngine's named_full_weights()")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load={args.load} sender={args.sender}")
    print("| params (M) | size (GB fp32) | receivers | bucket MB | alone MB | buckets | load 1m | bare s | bare GB/s | "
          "pipelined bare GB/s | pipelined/bare | depth | rlpost s | rlpost GB/s | rlpost/bare |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for params_m in args.params_m:
        if args.sender == "fsdp":
            import tempfile

            tmp = tempfile.TemporaryDirectory(prefix="bench_weight_sync_")
            source = _FSDPSource(params_m, tmp.name)
        else:
            source = _PlainSource(params_m)
        for receivers in args.receivers:
            for bucket_mb, alone_mb in [(b, a) for b in args.bucket_mb for a in args.alone_mb]:
                r = bench(source, receivers, bucket_mb, alone_mb, args.repeats, args.load, args.depth, args.profile)
                for what, sync_s in r["sync_s"].items():
                    print(f"| {r['params_m']:.1f} | {r['gb']:.3f} | {r['receivers']} | {r['bucket_mb']:g} | "
                          f"{r['alone_mb']:g} | {r['buckets']} | {r['load'][0]:.1f}-{r['load'][1]:.1f} | "
                          f"{r['bare_s']:.3f} | {r['gb'] / r['bare_s']:.2f} | {r['gb'] / r['piped_s']:.2f} | "
                          f"{r['piped_ratio']:.2f} | {what.split('d')[-1]} | {sync_s:.3f} | "
                          f"{r['gb'] / sync_s:.2f} | {r['ratio'][what]:.2f} |", flush=True)
        if args.sender == "fsdp":
            import torch.distributed as dist

            dist.destroy_process_group()
            tmp.cleanup()


if __name__ == "__main__":
    main()
