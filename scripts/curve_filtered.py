"""Held-out accuracy of ``+recipe=grpo_math`` trained on the difficulty filter's band
against the unfiltered data, at equal steps (docs/performance.md, issue #21).

    .venv/bin/python scripts/curve_filtered.py                  # filter 1536 prompts, 2 x 40 steps
    .venv/bin/python scripts/curve_filtered.py --table-only     # reprint the table of an earlier run

Three commands, one after another (never two at once, so each gets the machine):
1. ``python -m rlpost.data filter``: pass rates of the first ``--limit`` built-in train
   prompts under the built-in tiny model, ``--k`` samples each, ``--keep`` band kept;
2. ``python -m rlpost.train +recipe=grpo_math`` on the recipe's defaults (the unfiltered
   built-in data): the baseline;
3. the same on ``data.source=files`` with the kept prompts for training and the built-in
   val parquet for eval, so both runs evaluate the same 200 held-out prompts.
Same seed and settings otherwise. A step that already finished (its output folder holds
``report.json`` / ``final``) is not run again. Prints the filter's pass-rate histogram
and kept count, then ``eval/accuracy`` of both runs at every eval point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _run(cmd: list[str], done: Path) -> None:
    if done.exists():
        print(f"curve_filtered: {done} exists, not running again", flush=True)
        return
    print("curve_filtered: " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    print(f"curve_filtered: {time.time() - start:.0f} s wall, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores", flush=True)


def _accuracy(run_dir: Path) -> dict[int, float]:
    curve = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/accuracy" in row:
            curve[int(row["step"])] = float(row["eval/accuracy"])
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/curve", help="folder for the filter output and both runs")
    parser.add_argument("--limit", type=int, default=1536,
                        help="built-in train prompts filtered (1536 keeps about 770: 40 steps x 16 need no repeat)")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt in the filter")
    parser.add_argument("--keep", default="0.125:0.875", help="pass-rate band trained on")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-only", action="store_true", help="only print the table of an earlier run")
    args = parser.parse_args()

    out = Path(args.out)
    filt, base, band = out / "filter", out / "unfiltered", out / "band"
    python = [sys.executable, "-m"]
    common = ["+recipe=grpo_math", f"seed={args.seed}"]
    # The built-in val split is a parquet file in the data cache, named by its parameters
    # (rlpost.data.math_gen.write_builtin_math); the baseline run writes it if missing.
    from rlpost.config.load import load_config
    from rlpost.data.math_gen import write_builtin_math
    from rlpost.train import cache_root

    data = load_config(common).data
    if not args.table_only:
        _run([*python, "rlpost.data", "filter", *common, "reward.workers=1", f"filter.k={args.k}",
              f"filter.limit={args.limit}", "--keep", args.keep, "--output", str(filt)], filt / "report.json")
        _run([*python, "rlpost.train", *common, f"trainer.total_steps={args.steps}", f"output_dir={base}"],
             base / "final")
    _, val = write_builtin_math(cache_root() / "data", data.builtin_train_size, data.builtin_val_size,
                                data.builtin_max_level, args.seed)
    if not args.table_only:
        _run([*python, "rlpost.train", *common, f"trainer.total_steps={args.steps}", f"output_dir={band}",
              "data.source=files", f"data.train_files=[{(filt / 'kept.parquet').resolve()}]",
              f"data.val_files=[{val}]"], band / "final")

    report = json.loads((filt / "report.json").read_text())
    print(f"\nfilter: {report['scored']} prompts scored, k={args.k}, kept {report['kept']} in {args.keep}; "
          f"pass-rate histogram {report['pass_rate_histogram']}")
    print(f"eval on {val} (load average now {os.getloadavg()[0]:.1f})\n")
    curves = {"unfiltered": _accuracy(base), f"band {args.keep}": _accuracy(band)}
    steps = sorted(set().union(*curves.values()))
    print("| step | " + " | ".join(str(s) for s in steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for name, curve in curves.items():
        print(f"| {name} | " + " | ".join(f"{curve[s]:.3f}" if s in curve else "-" for s in steps) + " |")


if __name__ == "__main__":
    main()
