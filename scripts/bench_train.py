"""Training throughput and peak memory: FSDP2 vs DeepSpeed ZeRO-2/3, packing on/off.

Each configuration runs in its own process (so peak RSS is its own), world size 1,
on a random Qwen2 of about 30M parameters (weights do not change the speed), with
variable-length rows (uniform in [min_len, max_len]) and the token-mean policy loss.
Reports trained tokens/s (real tokens, padding excluded, over the timed steps) and
peak memory (CUDA max allocated on GPU, process max RSS on CPU).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_train.py            # all configs
    .venv/bin/python scripts/bench_train.py --configs fsdp2,zero2_packed --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

CONFIGS = {  # name -> (backend, zero_stage, packing)
    "fsdp2": ("fsdp2", 2, False), "fsdp2_packed": ("fsdp2", 2, True),
    "zero2": ("deepspeed", 2, False), "zero2_packed": ("deepspeed", 2, True),
    "zero3": ("deepspeed", 3, False), "zero3_packed": ("deepspeed", 3, True),
}


def build_model(path: str, args) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def run_one(name: str, model_dir: str, args) -> dict:
    """One configuration in this process (the child)."""
    import torch

    from rlpost.config.schema import ModelConfig, TrainerConfig
    from rlpost.distributed import init_default_group
    from rlpost.engines import make_train_engine
    from rlpost.types import TrainBatch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    backend, stage, packed = CONFIGS[name]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    init_default_group("127.0.0.1", port, 0, 1)
    cfg = TrainerConfig(backend=backend, zero_stage=stage, packing=packed, micro_batch_size=args.micro_batch_size,
                        lr=1e-5, total_steps=args.steps + 1)
    engine = make_train_engine(backend, model_dir, ModelConfig(path=model_dir, dtype=args.dtype), cfg)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.rows,), generator=g)
    T = int(lengths.max())
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, args.vocab, (args.rows, T), generator=g) * mask
    batch = TrainBatch(ids, mask, mask.float(), advantages=torch.randn(args.rows, T, generator=g),
                       global_num_tokens=float(mask.sum()))

    def loss_fn(out, mb):
        loss = -(out.logprobs * mb.advantages * mb.loss_mask).sum() / mb.global_num_tokens
        return loss, {}

    engine.train_step(batch, loss_fn, args.micro_batch_size)  # warm-up (allocator, JIT, optimizer state)
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.train_step(batch, loss_fn, args.micro_batch_size)
    elapsed = time.perf_counter() - start
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"config": name, "tokens_per_s": float(mask.sum()) * args.steps / elapsed, "peak_mb": peak_mb,
            "step_s": elapsed / args.steps, "padded_fraction": 1 - float(mask.sum()) / mask.numel()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], args.child[1], args)))
        return
    with tempfile.TemporaryDirectory() as model_dir:
        n = build_model(model_dir, args)
        print(f"model: Qwen2 {n / 1e6:.1f}M params, {args.layers} layers, hidden {args.hidden}; "
              f"{args.rows} rows of {args.min_len}-{args.max_len} tokens, micro-batch {args.micro_batch_size} rows, "
              f"{args.dtype}, {args.steps} timed steps", flush=True)
        print(f"{'config':<14} {'tokens/s':>9} {'s/step':>7} {'peak MB':>8}", flush=True)
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("configs", "child")]
        for name in args.configs.split(","):
            out = subprocess.run([sys.executable, __file__, *flags, "--child", name, model_dir],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{name:<14} failed:\n{out.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:<14} {r['tokens_per_s']:>9.0f} {r['step_s']:>7.2f} {r['peak_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
