"""Two (or more) checkouts of rlpost on the same work, side by side in one invocation:
the same model folder, recipe, seed and overrides, one ``python -m rlpost.train`` run
per checkout (and per extra override set), then a table of the median step and its
breakdown from each run's ``metrics.jsonl``.

    # before/after a change, the 24M-parameter Qwen2 shape of docs/performance.md
    .venv/bin/python scripts/bench_checkouts.py --hidden 512 --layers 8 --steps 4 \\
        --run before=/tmp/rlpost-main --run after=. --run after-1thread=.:trainer.threads=1,rollout.threads=1 \\
        -- data.train_batch_size=16 rollout.n=8 rollout.max_new_tokens=32 algorithm.kl_coef=0 \\
           eval.every=0 rollout.engine=hf

``--run NAME=DIR[:k=v,k=v]``: a label, a checkout, optional overrides for that run only.
The machine is shared and noisy: compare runs of one invocation, as ratios. Medians are
over steps 2.. (step 1 warms up); ``start s`` is command to first step line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

STAGES = ("rollout", "reward", "old_logprobs", "ref_logprobs", "train", "weight_sync")


def run_one(name: str, checkout: Path, extra: list[str], model: str, args) -> dict:
    out = args.out / name
    cmd = [sys.executable, "-u", "-m", "rlpost.train", f"+recipe={args.recipe}", f"model.path={model}",
           f"seed={args.seed}", f"trainer.total_steps={args.steps}", "trainer.save_every=0", "resume=never",
           f"output_dir={out}", "logger=[console,jsonl]", *args.overrides, *extra]
    print(f"$ (cd {checkout}) " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step, tail = None, []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if first_step is None and line.startswith("step "):
            first_step = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{''.join(tail)}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 1 and "timing/step_s" in r] or [r for r in rows if r["step"] > 0]

    def median(key):
        values = [r.get(key, 0.0) for r in steps]
        return statistics.median(values) if values else 0.0

    return {"start_s": first_step, "run_s": time.perf_counter() - start, "step_s": median("timing/step_s"),
            **{s: median(f"timing/{s}_s") for s in STAGES},
            "mfu": median("perf/mfu"), "tok_s": median("rollout/tokens_per_s"), "steps": len(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=DIR[:k=v,k=v]")
    parser.add_argument("--model", default="qwen2", help="qwen2 (random init, tiny-math's tokenizer) | tiny-math")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8, help="512 x 8: 24M parameters")
    parser.add_argument("--recipe", default="grpo_math")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_checkouts"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    from bench_step import model_path

    model = model_path(args.model, args.out, args.hidden, args.layers)
    runs = []
    for spec in args.run:
        name, _, rest = spec.partition("=")
        checkout, _, extra = rest.partition(":")
        runs.append((name, Path(checkout).resolve(), [kv for kv in extra.split(",") if kv]))
    print(f"load before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results = {name: run_one(name, checkout, extra, model, args) for name, checkout, extra in runs}
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    base = results[runs[0][0]]
    header = "| run | start s | step s | vs first | " + " | ".join(STAGES) + " | MFU | rollout tok/s |"
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for name, r in results.items():
        print(f"| {name} | {r['start_s'] or 0:.1f} | {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f}x | "
              + " | ".join(f"{r[s]:.2f}" for s in STAGES) + f" | {r['mfu']:.0%} | {r['tok_s']:.0f} |")
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
