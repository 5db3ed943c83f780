"""Measure a model on the built-in math val split: greedy pass@1, mean and pass@k of
temperature sampling, and format compliance.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/eval_tiny_model.py                    # builtin:tiny-math
    OMP_NUM_THREADS=1 .venv/bin/python scripts/eval_tiny_model.py --model runs/x/hf --n 8

Correctness here is a plain exact match of the last \\boxed{integer} against the
integer answer (the built-in answers are integers), so this script does not depend
on the reward module. "Format" means the completion ends with <|im_end|> and holds a
\\boxed{} answer.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def boxed_answer(text: str) -> str | None:
    found = BOXED.findall(text)
    return found[-1] if found else None


def generate(model, tokenizer, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int,
             batch_size: int) -> list[list[tuple[str, bool]]]:
    """n (text, ended_with_eos) completions per prompt, left-padded HF generate."""
    rows = [ids for ids in prompts for _ in range(n)]
    out: list[tuple[str, bool]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in chunk])
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk])
        sample = temperature > 0
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 do_sample=sample, temperature=temperature if sample else None, top_p=None, top_k=None,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for seq in gen[:, width:].tolist():
            ended = tokenizer.eos_token_id in seq
            if ended:
                seq = seq[:seq.index(tokenizer.eos_token_id)]
            out.append((tokenizer.decode(seq, skip_special_tokens=True), ended))
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-math")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--max-level", type=int, default=3)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt at --temperature")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    from transformers import AutoModelForCausalLM

    from rlpost.config.schema import DataConfig
    from rlpost.data.dataset import load_prompts
    from rlpost.models.loading import load_tokenizer, resolve_model_path

    start = time.time()
    path = resolve_model_path(args.model, seed=args.seed)
    print(f"model {path} ready in {time.time() - start:.1f}s")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    print(f"params {sum(p.numel() for p in model.parameters()):,}")

    cfg = DataConfig(builtin_val_size=args.val_size, builtin_max_level=args.max_level)
    with tempfile.TemporaryDirectory() as data_dir:
        samples, report = load_prompts(cfg, tokenizer, "val", seed=args.seed, data_dir=Path(data_dir))
    print(report.summary())
    prompts = [list(s.prompt_ids) for s in samples]

    start = time.time()
    greedy = [c[0] for c in generate(model, tokenizer, prompts, 1, 0.0, args.max_new_tokens, args.batch_size)]
    print(f"greedy generation {time.time() - start:.1f}s")
    start = time.time()
    sampled = generate(model, tokenizer, prompts, args.n, args.temperature, args.max_new_tokens, args.batch_size)
    print(f"sampling {len(prompts)}x{args.n} {time.time() - start:.1f}s")

    def correct(text: str, answer: str) -> bool:
        return boxed_answer(text) == answer

    def formatted(text: str, ended: bool) -> bool:
        return ended and boxed_answer(text) is not None

    levels = sorted({s.metadata.get("level", 0) for s in samples})
    for level in [None, *levels]:
        idx = [i for i, s in enumerate(samples) if level is None or s.metadata.get("level") == level]
        g_acc = sum(correct(greedy[i][0], samples[i].answer) for i in idx) / len(idx)
        g_fmt = sum(formatted(*greedy[i]) for i in idx) / len(idx)
        s_mean = sum(correct(t, samples[i].answer) for i in idx for t, _ in sampled[i]) / (len(idx) * args.n)
        s_fmt = sum(formatted(t, e) for i in idx for t, e in sampled[i]) / (len(idx) * args.n)
        pass_k = sum(any(correct(t, samples[i].answer) for t, _ in sampled[i]) for i in idx) / len(idx)
        name = "all" if level is None else f"level {level}"
        print(f"{name:8s} n={len(idx):4d}  greedy acc {g_acc:.3f} fmt {g_fmt:.3f} | "
              f"T={args.temperature} mean@{args.n} {s_mean:.3f} pass@{args.n} {pass_k:.3f} fmt {s_fmt:.3f}")
    for i in range(3):
        print(repr(samples[i].question), "->", repr(greedy[i][0]), "| answer", samples[i].answer)


if __name__ == "__main__":
    main()
