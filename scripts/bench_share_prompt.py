"""Training step with and without ``trainer.share_prompt``, side by side in one process.

The GRPO shape of docs/performance.md: ``--prompts`` chat-templated math prompts
(rlpost's built-in stream, about 40 tokens with tiny-math's tokenizer) x ``--n``
completions of ``--completion-len`` random tokens, on the random 24M Qwen2 of
``bench_rollout.py`` (512 wide, 8 layers, GQA 8:2, vocab 492), FSDP2 world 1,
micro-batches of ``--micro-batch-size`` rows, token-mean policy loss. Two engines from
the same folder, one per setting; at each torch thread count, each repeat times one
``train_step`` and one ``forward_logprobs`` of each, alternating which goes first.
Prints per-repeat times, the medians and the median of the per-repeat ratios.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_share_prompt.py --repeats 3 --threads 2,1
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_batch(model_dir: str, args):
    from bench_rollout import math_prompts

    from rlpost.types import TrainBatch

    g = torch.Generator().manual_seed(0)
    prompts = [row["prompt_ids"] for row in math_prompts(model_dir, args.prompts)]
    rows, prompt_lens = [], []
    for ids in prompts:
        for _ in range(args.n):
            rows.append(list(ids) + torch.randint(10, 400, (args.completion_len,), generator=g).tolist())
            prompt_lens.append(len(ids))
    T = max(map(len, rows))
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), T)
    for i, (r, p) in enumerate(zip(rows, prompt_lens)):
        input_ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        loss_mask[i, p:len(r)] = 1.0
    adv = torch.randn(len(rows), 1, generator=g).expand(-1, T).contiguous()
    batch = TrainBatch(input_ids, mask, loss_mask, advantages=adv, global_num_tokens=float(loss_mask.sum()))
    return batch, prompt_lens


def loss_fn(out, mb):
    loss = -(out.logprobs * mb.advantages * mb.loss_mask).sum() / mb.global_num_tokens
    return loss, {"loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2-24m", help="a model name of bench_rollout.py")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--completion-len", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "bench_models")
    args = parser.parse_args()

    from bench_rollout import model_folder

    from rlpost.config.schema import ModelConfig, TrainerConfig
    from rlpost.distributed import init_default_group
    from rlpost.engines.fsdp import FSDPEngine

    model_dir = model_folder(args.model, args.out)
    batch, prompt_lens = make_batch(model_dir, args)
    print(f"{args.model}: {batch.size} rows, prompts {min(prompt_lens)}-{max(prompt_lens)} tokens, "
          f"completions {args.completion_len}, micro-batch {args.micro_batch_size} rows", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_default_group("127.0.0.1", port, 0, 1, backend="gloo")
    engines = {share: FSDPEngine(model_dir, ModelConfig(path=model_dir),
                                 TrainerConfig(lr=1e-6, micro_batch_size=args.micro_batch_size, share_prompt=share))
               for share in (False, True)}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for engine in engines.values():  # warm-up: allocator, thread pools
            engine.train_step(batch, loss_fn, args.micro_batch_size)
        times = {(kind, share): [] for kind in ("train", "logprobs") for share in (False, True)}
        for rep in range(args.repeats):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for share in order:
                engine = engines[share]
                t0 = time.perf_counter()
                engine.train_step(batch, loss_fn, args.micro_batch_size)
                times["train", share].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                engine.forward_logprobs(batch)
                times["logprobs", share].append(time.perf_counter() - t0)
            print(f"  threads {threads} repeat {rep}: train plain {times['train', False][-1]:.2f} s, "
                  f"shared {times['train', True][-1]:.2f} s; old log-probs plain {times['logprobs', False][-1]:.2f} s, "
                  f"shared {times['logprobs', True][-1]:.2f} s", flush=True)
        for kind in ("train", "logprobs"):
            plain, shared = times[kind, False], times[kind, True]
            ratio = statistics.median(s / p for s, p in zip(shared, plain))
            print(f"threads {threads} {kind:8s}: plain median {statistics.median(plain):.2f} s, shared "
                  f"{statistics.median(shared):.2f} s, shared/plain median ratio {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
