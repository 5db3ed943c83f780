"""Training modes side by side: ``trainer.mode=sync|one_step_off|async``, and
``async_inflight`` (async with ``trainer.inflight_updates=true``: weights pushed into
requests in flight), same recipe, seed and model, one ``python -m rlpost.train`` run
per mode, one after the other.

    # speed: a model where generation dominates (a deep, narrow random Qwen2 with
    # tiny-math's tokenizer: HF decoding cost grows with depth, training with parameters)
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_step.py --model qwen2 --hidden 256 --layers 24 \
        --steps 4 -- data.train_batch_size=4 rollout.n=2 rollout.max_new_tokens=128 eval.every=0
    # accuracy: the built-in tiny model, the full recipe
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_step.py --model tiny-math

Everything after ``--`` is passed to every run (Hydra overrides). Each run writes
``metrics.jsonl`` under ``--out``; the table is computed from it:

- ``s/step``: training-loop wall time (the sum of ``timing/step_s``, which in the
  overlapped modes includes waiting for a batch) over the steps; ``from 2``: the same
  without step 1, which nothing can overlap. ``run s``: the whole process, start-up,
  evals and export included.
- ``gen tok/s``: completion tokens generated over that wall time.
- ``rollout``, ``train``, ``sync``, ``idle``: how busy each resource was, as a share of
  that wall time: replicas sampling and rewards scoring (``timing/rollout_s`` +
  ``timing/reward_s``), the trainer computing (old/ref log-probs, critic, update),
  the weight push, and the trainer waiting for samples (``timing/idle_s``). In sync
  mode they add up to about 100%; overlapped, rollout and train run at once, so
  they add up to more.
- ``accuracy``: the last ``eval/accuracy`` (held-out greedy), i.e. after
  ``steps x train_batch_size x n`` samples; needs ``eval.every`` > 0.
- ``stale``: mean ``async/staleness_mean`` (lag of each sample's oldest token);
  ``old tok``: mean share of sampled tokens at least one version behind
  (``async/token_lag_1`` + ``async/token_lag_2plus``); ``dropped``: batches dropped as too stale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def model_path(name: str, out: Path, hidden: int, layers: int) -> str:
    from rlpost.models.loading import resolve_model_path

    tiny = resolve_model_path("builtin:tiny-math")
    if name == "tiny-math":
        return "builtin:tiny-math"
    if name == "qwen2":
        sys.path.insert(0, str(REPO / "scripts"))
        from bench_rollout import build_qwen2

        folder = out / f"qwen2-{hidden}x{layers}"
        return str(folder) if (folder / "config.json").exists() else build_qwen2(folder, tiny, hidden, layers)
    raise SystemExit(f"unknown model {name!r}; choose tiny-math or qwen2")


# Mode name -> its overrides.
MODES = {
    "sync": ["trainer.mode=sync"],
    "one_step_off": ["trainer.mode=one_step_off"],
    "async": ["trainer.mode=async"],
    "async_inflight": ["trainer.mode=async", "trainer.inflight_updates=true"],
}


def run_mode(mode: str, model: str, args, overrides: list[str]) -> dict:
    out = args.out / mode
    cmd = [sys.executable, "-m", "rlpost.train", f"+recipe={args.recipe}", f"model.path={model}",
           f"seed={args.seed}", f"trainer.total_steps={args.steps}", *MODES[mode], "trainer.save_every=0",
           "resume=never", f"output_dir={out}", "logger=[jsonl]", *overrides]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    run_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summarize(rows, run_s)


def summarize(rows: list[dict], run_s: float) -> dict:
    steps = [r for r in rows if r["step"] > 0 and "timing/step_s" in r]

    def total(*keys):
        return sum(r.get(k, 0.0) for r in steps for k in keys)

    wall = total("timing/step_s")
    # rollout/tokens_per_s is the step's completion tokens over its timing/rollout_s.
    tokens = sum(r["rollout/tokens_per_s"] * r["timing/rollout_s"] for r in steps)
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    return {
        "steps": len(steps), "run_s": run_s, "s_per_step": wall / len(steps), "tok_s": tokens / wall,
        # Step 1 cannot overlap anything (nothing was sampled ahead): the steady state is from step 2.
        "s_per_step_2": sum(r["timing/step_s"] for r in steps[1:]) / max(len(steps) - 1, 1),
        "rollout": total("timing/rollout_s", "timing/reward_s") / wall,
        "train": total("timing/old_logprobs_s", "timing/ref_logprobs_s", "timing/values_s", "timing/critic_s",
                       "timing/train_s") / wall,
        "sync": total("timing/weight_sync_s") / wall, "idle": total("timing/idle_s") / wall,
        "accuracy": evals[-1] if evals else None, "accuracy_start": evals[0] if evals else None,
        "stale": total("async/staleness_mean") / len(steps),
        "old_tokens": total("async/token_lag_1", "async/token_lag_2plus") / len(steps),
        "dropped": steps[-1].get("async/dropped_batches", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="sync,one_step_off,async,async_inflight", help=", ".join(MODES))
    parser.add_argument("--model", default="tiny-math", help="tiny-math | qwen2 (random init, tiny-math's tokenizer)")
    parser.add_argument("--hidden", type=int, default=512, help="qwen2 width (512 x 10 layers: 31M parameters)")
    parser.add_argument("--layers", type=int, default=10, help="qwen2 depth")
    parser.add_argument("--recipe", default="grpo_math")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_step"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_path(args.model, args.out, args.hidden, args.layers)
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}", flush=True)
    results = {mode: run_mode(mode, model, args, args.overrides) for mode in args.modes.split(",")}
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    base = results.get("sync")
    header = ("| mode | steps | s/step | vs sync | s/step from 2 | vs sync | run s | gen tok/s | rollout | train | sync | idle "
              "| stale | old tok | dropped | accuracy |")
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for mode, r in results.items():
        speedup = f"{base['s_per_step'] / r['s_per_step']:.2f}x" if base else "-"
        speedup_2 = f"{base['s_per_step_2'] / r['s_per_step_2']:.2f}x" if base else "-"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy_start']:.3f} -> {r['accuracy']:.3f}"
        print(f"| {mode} | {r['steps']} | {r['s_per_step']:.2f} | {speedup} | {r['s_per_step_2']:.2f} | {speedup_2} "
              f"| {r['run_s']:.0f} | {r['tok_s']:.0f} "
              f"| {r['rollout']:.0%} | {r['train']:.0%} | {r['sync']:.0%} | {r['idle']:.0%} | {r['stale']:.2f} "
              f"| {r['old_tokens']:.0%} | {r['dropped']:.0f} | {acc} |")
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
