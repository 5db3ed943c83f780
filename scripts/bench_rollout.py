"""Rollout throughput: the HF engine against the vLLM engine, same prompts, same sampling.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rollout.py
    OMP_NUM_THREADS=1 /path/to/vllm-venv/bin/python scripts/bench_rollout.py --dtype bfloat16 --prompts 32

Models: ``builtin:tiny-math`` (0.5M parameters, the recipes' default) and a ~31M
parameter Qwen2 built here with random weights and tiny-math's tokenizer (random
weights are fine for throughput; completions run until EOS or the cap either way).
Prompts are random token ids (special tokens excluded) of 24-40 tokens, fixed by
``--seed``. Throughput is completion tokens generated (EOS included) per second of
``generate`` wall time, after one warm-up call, median over ``--repeats`` calls; each
call draws fresh samples. Engine start-up is reported separately. An engine that
is not installed is reported as such and skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def build_qwen2(out: Path, tokenizer_dir: str, hidden: int = 512, layers: int = 10) -> str:
    """A random Qwen2 with ``tokenizer_dir``'s tokenizer (head size 64, GQA 8:2)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def random_prompts(model_dir: str, count: int, seed: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([t for t in range(len(tokenizer)) if t not in special])
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(24, 41, (count,), generator=gen).tolist()
    return [vocab[torch.randint(len(vocab), (n,), generator=gen)].tolist() for n in lengths]


def make_engine(name: str, model_dir: str, args):
    if name == "hf":
        from rlpost.engines.hf_rollout import HFRolloutEngine

        return HFRolloutEngine(model_dir, dtype=args.dtype, seed=0, batch_size=args.prompts * args.n)
    from rlpost.engines.vllm_rollout import VLLMRolloutEngine

    return VLLMRolloutEngine(model_dir, dtype=args.dtype, seed=0, max_model_len=40 + args.max_new_tokens,
                             kv_cache_gb=args.kv_cache_gb)


def bench(name: str, model_dir: str, prompts, args) -> dict:
    from rlpost.types import SamplingParams

    start = time.perf_counter()
    engine = make_engine(name, model_dir, args)
    startup = time.perf_counter() - start
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens)
    engine.generate(prompts[:4], params)  # warm-up
    rates, lengths = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for group in out for c in group)
        rates.append(tokens / seconds)
        lengths.append(tokens / (len(prompts) * args.n))
    del engine
    return {"startup_s": startup, "tok_s": statistics.median(rates), "mean_len": statistics.mean(lengths)}


def installed(name: str) -> bool:
    import importlib.util

    return name == "hf" or importlib.util.find_spec("vllm") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--models", default="tiny-math,qwen2-31m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (rollout actors use 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rlpost.models.loading import resolve_model_path

    tiny = resolve_model_path("builtin:tiny-math")
    tmp = tempfile.TemporaryDirectory(prefix="bench-rollout-")
    models = {}
    for model in args.models.split(","):
        if model == "tiny-math":
            models[model] = tiny
        elif model == "qwen2-31m":
            models[model] = build_qwen2(Path(tmp.name) / model, tiny)
        else:
            parser.error(f"unknown model {model!r}; choose from tiny-math, qwen2-31m")

    print(f"{args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, "
          f"temperature={args.temperature}, top_p={args.top_p}, {args.dtype}, {args.threads} torch thread(s)")
    header = f"{'model':<11} {'params':>7} {'engine':<6} {'start s':>8} {'tok/s':>9} {'mean len':>9}"
    print(header + "\n" + "-" * len(header))
    for model, path in models.items():
        prompts = random_prompts(path, args.prompts, args.seed)
        params = _param_count(path)
        for name in args.engines.split(","):
            if not installed(name):
                print(f"{model:<11} {params:>7} {name:<6} not installed")
                continue
            r = bench(name, path, prompts, args)
            print(f"{model:<11} {params:>7} {name:<6} {r['startup_s']:>8.1f} {r['tok_s']:>9.0f} {r['mean_len']:>9.1f}",
                  flush=True)


def _param_count(model_dir: str) -> str:
    from safetensors import safe_open

    total = 0
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                total += torch.Size(f.get_slice(name).get_shape()).numel()
    return f"{total / 1e6:.1f}M"


if __name__ == "__main__":
    main()
