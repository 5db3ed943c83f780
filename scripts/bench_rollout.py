"""Rollout throughput: rlpost's engines next to bare vLLM and HF ``generate``, same requests.

    .venv/bin/python scripts/bench_rollout.py                       # 24M Qwen2, 1 and 2 threads
    .venv/bin/python scripts/bench_rollout.py --models tiny-math,qwen2-24m,qwen2-100m --threads 2

Engines (``--engines``):

- ``hf``: ``rlpost.engines.hf_rollout.HFRolloutEngine`` (rlpost's KV-cached sampling loop);
- ``vllm``: ``rlpost.engines.vllm_rollout.VLLMRolloutEngine`` (in-process vLLM, sampler log-probs);
- ``hf-generate``: bare ``model.generate`` (what TRL's ``GRPOTrainer`` calls without vLLM),
  ``do_sample=True, top_k=0``, left-padded, ``num_return_sequences=n``;
- ``vllm-bare``: bare ``vllm.LLM.generate`` in-process, no log-probs, same sizes.

Models: ``tiny-math`` (the built-in 0.6M model) and random-init Qwen2s with tiny-math's
tokenizer, named ``qwen2-24m`` (512 wide x 8 layers), ``qwen2-100m`` (768 x 15), or
``qwen2-HxL`` for any other shape (random weights are fine for throughput; completions
run until EOS or the cap either way). Requests: the first ``--prompts`` chat-templated
prompts of rlpost's built-in math training data, ``--n`` samples each, temperature 1,
top-p 1, at most ``--max-new-tokens`` tokens: the shape of one ``+recipe=grpo_math`` step.

Threads: every engine is measured at each count in ``--threads`` (``torch.set_num_threads``
for the HF paths and bare vLLM, the engine's ``num_threads`` argument for rlpost's vLLM
engine). Throughput is completion tokens generated (EOS included) per second of
``generate`` wall time (``tok/s``) and per second of this process's CPU time
(``tok/cpu-s``: at one thread, what the same work would reach on an idle core; on a
shared machine the steadier of the two), after one warm-up call, median over
``--repeats`` calls. vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
so its work is counted too. An engine
that is not installed is reported as such and skipped.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHAPES = {"qwen2-24m": (512, 8), "qwen2-31m": (512, 10), "qwen2-100m": (768, 15)}


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


def model_folder(name: str, out: Path) -> str:
    """The folder for a model name of this script (see the module docstring); built
    once under ``out`` and reused."""
    from rlpost.models.loading import resolve_model_path

    tiny = resolve_model_path("builtin:tiny-math")
    if name == "tiny-math":
        return tiny
    shape = SHAPES.get(name)
    match = re.fullmatch(r"qwen2-(\d+)x(\d+)", name)
    if shape is None and match:
        shape = int(match[1]), int(match[2])
    if shape is None:
        raise SystemExit(f"unknown model {name!r}; choose tiny-math, {', '.join(SHAPES)} or qwen2-HxL")
    folder = out / f"qwen2-{shape[0]}x{shape[1]}"
    return str(folder) if (folder / "config.json").exists() else build_qwen2(folder, tiny, *shape)


def math_prompts(model_dir: str, count: int, seed: int = 0) -> list[dict]:
    """The first ``count`` problems of rlpost's built-in math training stream,
    chat-templated with ``model_dir``'s tokenizer exactly as ``rlpost.data`` does:
    ``{"prompt_ids", "messages", "question", "answer"}`` each."""
    from transformers import AutoTokenizer

    from rlpost.data.dataset import template_prompt
    from rlpost.data.math_gen import generate_problems

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for problem in generate_problems(count, 3, seed, "train", heldout=False):
        messages = [{"role": "user", "content": problem.question}]
        rows.append({"prompt_ids": template_prompt(tokenizer, messages), "messages": messages,
                     "question": problem.question, "answer": str(problem.answer)})
    return rows


def param_count(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                total += torch.Size(f.get_slice(name).get_shape()).numel()
    return total


# ---------------------------------------------------------------- the four paths


class RlpostEngine:
    def __init__(self, name: str, model_dir: str, args, threads: int):
        if name == "hf":
            from rlpost.engines.hf_rollout import HFRolloutEngine

            self.engine = HFRolloutEngine(model_dir, dtype=args.dtype, seed=0, batch_size=args.prompts * args.n,
                                          num_threads=threads)
        else:
            from rlpost.engines.vllm_rollout import VLLMRolloutEngine

            self.engine = VLLMRolloutEngine(model_dir, dtype=args.dtype, seed=0,
                                            max_model_len=args.max_prompt_len + args.max_new_tokens,
                                            kv_cache_gb=args.kv_cache_gb, num_threads=threads)
        from rlpost.types import SamplingParams

        self.params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)

    def generate(self, prompts: list[list[int]]) -> int:
        out = self.engine.generate(prompts, self.params)
        return sum(len(c.token_ids) for group in out for c in group)


class BareHFGenerate:
    def __init__(self, model_dir: str, args, threads: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
        self.n, self.max_new_tokens = args.n, args.max_new_tokens
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]]) -> int:
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=self.max_new_tokens, num_return_sequences=self.n,
                                  pad_token_id=self.pad, eos_token_id=self.eos)[:, width:]
        # Tokens up to and including the first EOS (later positions are padding).
        is_eos = out == self.eos
        ended = is_eos.any(-1)
        lengths = torch.where(ended, is_eos.int().argmax(-1) + 1, torch.full_like(ended, out.shape[1], dtype=torch.long))
        return int(lengths.sum())


class BareVLLM:
    def __init__(self, model_dir: str, args, threads: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM, SamplingParams

        from rlpost.engines.vllm_rollout import _restore_set_num_threads

        original = torch.set_num_threads
        original(threads)  # in-process vLLM computes with this process's torch threads
        self.llm = LLM(model=model_dir, dtype=args.dtype, seed=0, enforce_eager=True,
                       max_model_len=args.max_prompt_len + args.max_new_tokens,
                       kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30), enable_chunked_prefill=False)
        _restore_set_num_threads(original)
        self.params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens)

    def generate(self, prompts: list[list[int]]) -> int:
        from vllm.inputs import TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], self.params, use_tqdm=False)
        return sum(len(c.token_ids) for o in out for c in o.outputs)


def make(name: str, model_dir: str, args, threads: int):
    if name in ("hf", "vllm"):
        return RlpostEngine(name, model_dir, args, threads)
    if name == "hf-generate":
        return BareHFGenerate(model_dir, args, threads)
    if name == "vllm-bare":
        return BareVLLM(model_dir, args, threads)
    raise SystemExit(f"unknown engine {name!r}; choose from hf, vllm, hf-generate, vllm-bare")


def bench(name: str, model_dir: str, prompts: list[list[int]], args, threads: int) -> dict:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    engine = make(name, model_dir, args, threads)
    startup = time.perf_counter() - start
    engine.generate(prompts[:4])  # warm-up
    rates, cpu_rates, lengths = [], [], []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        tokens = engine.generate(prompts)
        rates.append(tokens / (time.perf_counter() - start))
        cpu_rates.append(tokens / (time.process_time() - cpu))
        lengths.append(tokens / (len(prompts) * args.n))
    del engine
    return {"startup_s": startup, "tok_s": statistics.median(rates), "tok_cpu_s": statistics.median(cpu_rates),
            "mean_len": statistics.mean(lengths)}


def installed(name: str) -> bool:
    import importlib.util

    return not name.startswith("vllm") or importlib.util.find_spec("vllm") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="hf,vllm,hf-generate,vllm-bare")
    parser.add_argument("--models", default="qwen2-24m", help="tiny-math, qwen2-24m, qwen2-100m, qwen2-HxL")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="torch thread counts to measure, e.g. 1,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="where built models are kept (default: a temp dir)")
    args = parser.parse_args()

    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="bench-rollout-")
    out = args.out or Path(tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.prompts} math prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, T=1, top_p=1, "
          f"{args.dtype}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    header = (f"{'model':<11} {'params':>7} {'engine':<12} {'threads':>7} {'start s':>8} {'tok/s':>7} {'tok/cpu-s':>9} "
              f"{'mean len':>8}")
    print(header + "\n" + "-" * len(header), flush=True)
    for model in args.models.split(","):
        path = model_folder(model, out)
        rows = math_prompts(path, args.prompts, args.seed)
        prompts = [r["prompt_ids"] for r in rows]
        args.max_prompt_len = max(map(len, prompts))
        params = f"{param_count(path) / 1e6:.1f}M"
        for threads in [int(t) for t in args.threads.split(",")]:
            for name in args.engines.split(","):
                if not installed(name):
                    print(f"{model:<11} {params:>7} {name:<12} not installed", flush=True)
                    continue
                r = bench(name, path, prompts, args, threads)
                print(f"{model:<11} {params:>7} {name:<12} {threads:>7} {r['startup_s']:>8.1f} {r['tok_s']:>7.0f} "
                      f"{r['tok_cpu_s']:>9.0f} {r['mean_len']:>8.1f}", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
