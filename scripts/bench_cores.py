"""How much two busy processes get out of this machine's cores: the ceiling of any
overlap of sampling and training (``trainer.mode=async|one_step_off``) on one host.

A training step (forward + backward) and a sampling phase (token-by-token decoding
with a KV cache) of the same random Qwen2 run in their own processes at one thread
each, as rlpost's trainer rank and rollout replica do: first each alone, then both at
once (started together). Sync mode runs them one after the other, so it takes
``alone_train + alone_sample``; a perfect overlap takes the longer of the two run side
by side. Their ratio is the most any overlapped mode can gain over sync on this host,
whatever the framework: it is 2.0 only if the phases are equally long and neither slows
the other down.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_cores.py --hidden 256 --layers 24

The phases' lengths are balanced first (``--balance``): the sampling phase's token count
is scaled so that alone it takes as long as the training phase, the best case for an
overlap. Plain torch and transformers; no rlpost code runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time


def _model(hidden: int, layers: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=1024, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).float()


def _train(model, batch: int, seq: int, reps: int) -> None:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 512, (batch, seq))
    for _ in range(reps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _sample(model, batch: int, prompt: int, new_tokens: int, reps: int) -> None:
    import torch

    ids = torch.randint(0, 512, (batch, prompt))
    with torch.no_grad():
        for _ in range(reps):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=True, pad_token_id=0)


def _worker(kind: str, args: dict, start, results) -> None:
    import torch

    torch.set_num_threads(1)
    model = _model(args["hidden"], args["layers"])
    run = (lambda: _train(model, args["batch"], args["seq"], args["train_reps"])) if kind == "train" else \
        (lambda: _sample(model, args["batch"], args["prompt"], args["new_tokens"], args["sample_reps"]))
    if kind == "train":
        _train(model, args["batch"], args["seq"], 1)  # warm-up: allocator, optimizer state
    else:
        _sample(model, args["batch"], args["prompt"], 8, 1)
    start.wait()
    began = time.perf_counter()
    run()
    results.put((kind, time.perf_counter() - began))


def _run(kinds: list[str], args: dict) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(len(kinds)), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(k, args, start, results)) for k in kinds]
    for p in procs:
        p.start()
    out: dict[str, float] = {}
    for _ in kinds:
        kind, seconds = results.get(timeout=1800)
        out[kind if kind not in out else kind + "2"] = seconds
    for p in procs:
        p.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8, help="sequences per phase (train_batch_size x n)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--train-reps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="measure the side-by-side pair this many times")
    parser.add_argument("--no-balance", dest="balance", action="store_false")
    parser.add_argument("--json", help="also write the numbers here")
    a = parser.parse_args()
    args = dict(hidden=a.hidden, layers=a.layers, batch=a.batch, prompt=a.prompt, new_tokens=a.new_tokens,
                seq=a.prompt + a.new_tokens, train_reps=a.train_reps, sample_reps=1)
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    train = _run(["train"], args)["train"]
    sample = _run(["sample"], args)["sample"]
    if a.balance:  # whole generate calls, as many as fit in the training phase's time
        args["sample_reps"] = max(1, round(train / sample))
        sample = _run(["sample"], args)["sample"]
    print(f"alone: train {train:.2f} s, sample {sample:.2f} s ({args['sample_reps']} x {a.batch} x "
          f"{a.new_tokens} tokens)", flush=True)
    rows = []
    for i in range(a.repeats):
        both = _run(["train", "sample"], args)
        pair = max(both.values())
        rows.append(dict(train=both["train"], sample=both["sample"], pair=pair, ceiling=(train + sample) / pair))
        print(f"side by side #{i + 1}: train {both['train']:.2f} s ({both['train'] / train:.2f}x alone), "
              f"sample {both['sample']:.2f} s ({both['sample'] / sample:.2f}x alone); sync would take "
              f"{train + sample:.2f} s, the overlap {pair:.2f} s: ceiling {(train + sample) / pair:.2f}x", flush=True)
    twin = _run(["train", "train"], args)
    print(f"two training processes at once: {twin['train']:.2f} / {twin['train2']:.2f} s "
          f"({max(twin.values()) / train:.2f}x one alone)", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=args, alone=dict(train=train, sample=sample), side_by_side=rows, twin=twin), f, indent=1)


if __name__ == "__main__":
    main()
