"""Metric sinks: console (progress bar with ETA + one readable line per step),
``metrics.jsonl`` in the run directory, and wandb when asked.

Every sink receives the same dict for a step, assembled on the driver from metrics
that were already reduced over all ranks and replicas.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from rlpost.config.schema import LoggerConfig

# Metrics shown on the console line, in order, with their short labels.
CONSOLE_KEYS = [
    ("reward/mean", "reward"), ("eval/accuracy", "eval_acc"), ("policy/kl", "kl"),
    ("policy/entropy", "ent"), ("policy/clip_frac", "clip"), ("policy/grad_norm", "gnorm"),
    ("response/length_mean", "len"), ("timing/step_s", "step_s"),
]


def _clean(value):
    """JSON has no NaN/inf: write them as strings so the line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    def __init__(self, cfg: LoggerConfig, output_dir: Path, total_steps: int, run_config: dict):
        self.cfg, self.total_steps = cfg, total_steps
        self.output_dir = Path(output_dir)
        self.bar = None
        self.wandb_run = None
        self._start, self._start_step = time.time(), None
        if cfg.jsonl is not None:
            self.jsonl_path = self.output_dir / cfg.jsonl.filename
        if cfg.wandb is not None:
            self.wandb_run = _init_wandb(cfg, self.output_dir, run_config)

    def start(self, first_step: int) -> None:
        self._start, self._start_step = time.time(), first_step
        if self.cfg.console is not None and self.cfg.console.progress_bar and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=first_step, desc="rlpost", unit="step", dynamic_ncols=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop jsonl lines of steps after the checkpoint, which the resumed
        run will write again, so each step appears once."""
        if self.cfg.jsonl is None or not self.jsonl_path.exists():
            return
        lines = self.jsonl_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        self.jsonl_path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self.cfg.jsonl is not None:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.cfg.console is not None:
            self._console(step, metrics)

    def _console(self, step: int, metrics: dict) -> None:
        parts = [f"step {step}/{self.total_steps}"]
        for key, label in CONSOLE_KEYS:
            if key in metrics and isinstance(metrics[key], (int, float)):
                parts.append(f"{label}={metrics[key]:.4g}")
        timing = [f"{k.split('/')[1][:-2]}={v:.1f}s" for k, v in metrics.items()
                  if k.startswith("timing/") and k != "timing/step_s" and k.endswith("_s")]
        line = " | ".join(parts) + ("  [" + " ".join(timing) + "]" if timing else "")
        if self.bar is not None:
            self.bar.write(line)
            if step > self.bar.n:
                self.bar.update(step - self.bar.n)
        else:
            print(line + self._eta(step), flush=True)

    def _eta(self, step: int) -> str:
        done = step - (self._start_step or 0)
        if done <= 0 or step >= self.total_steps:
            return ""
        per_step = (time.time() - self._start) / done
        return f"  eta {per_step * (self.total_steps - step):.0f}s"

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _init_wandb(cfg: LoggerConfig, output_dir: Path, run_config: dict):
    import wandb

    mode = cfg.wandb.mode
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or os.environ.get("WANDB_MODE") == "online"
        mode = os.environ.get("WANDB_MODE", "online" if has_key else "offline")
    # A stable id stored in the run directory makes a resumed run continue the same
    # wandb run instead of starting a new one.
    id_file = output_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, id=run_id, resume="allow",
                      dir=str(output_dir), mode=mode, config=run_config)
