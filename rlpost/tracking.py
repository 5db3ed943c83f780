"""Metric sinks: console (progress bar with ETA + one readable line per step),
``metrics.jsonl`` in the run directory, and wandb, TensorBoard and MLflow when asked.

Every sink receives the same dict for a step, assembled on the driver from metrics
that were already reduced over all ranks and replicas.

Sampled completions (``log_samples``) go to ``samples.jsonl`` next to
``metrics.jsonl`` (what ``python -m rlpost.report`` shows), and as a table to wandb,
TensorBoard (text) and MLflow (``samples/step_<n>.json``).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rlpost.config.schema import LoggerConfig
from rlpost.errors import ConfigError

# Metrics shown on the console line, in order, with their short labels.
CONSOLE_KEYS = [
    ("reward/mean", "reward"), ("eval/accuracy", "eval_acc"), ("policy/kl", "kl"),
    ("policy/entropy", "ent"), ("policy/clip_frac", "clip"), ("policy/grad_norm", "gnorm"),
    ("response/length_mean", "len"), ("timing/step_s", "step_s"),
    ("perf/mfu", "mfu"), ("perf/tokens_per_s_per_device", "tok/s/dev"),
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
        self.tensorboard = self.mlflow = None
        if cfg.jsonl is not None:
            self.jsonl_path = self.output_dir / cfg.jsonl.filename
            self.samples_path = self.output_dir / cfg.jsonl.samples_filename
        if cfg.wandb is not None:
            self.wandb_run = _init_wandb(cfg, self.output_dir, run_config)
        if cfg.tensorboard is not None:
            self.tensorboard = _TensorboardSink(self.output_dir / cfg.tensorboard.dir)
        if cfg.mlflow is not None:
            self.mlflow = _MlflowSink(cfg, self.output_dir, run_config)

    def start(self, first_step: int) -> None:
        self._start, self._start_step = time.time(), first_step
        if self.cfg.console is not None and self.cfg.console.progress_bar and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=first_step, desc="rlpost", unit="step", dynamic_ncols=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop jsonl lines of steps after the checkpoint, which the resumed
        run will write again, so each step appears once."""
        if self.cfg.jsonl is None:
            return
        for path in (self.jsonl_path, self.samples_path):
            if path.exists():
                lines = path.read_text().splitlines()
                kept = [line for line in lines if line.strip() and _line_step(line) <= step]
                path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self.cfg.jsonl is not None:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.tensorboard is not None:
            self.tensorboard.log(step, metrics)
        if self.mlflow is not None:
            self.mlflow.log(step, metrics)
        if self.cfg.console is not None:
            self._console(step, metrics)

    def log_samples(self, step: int, rows: Sequence[dict]) -> None:
        """Record sampled completions of ``step``. Each row is a dict with at least
        ``completion`` and ``reward`` (usually also ``prompt``, ``answer`` and a
        ``components`` dict of named reward parts; see ``trajectory_rows``); other
        JSON-serialisable keys are kept. Appends one line per row to samples.jsonl
        and logs a table to wandb / TensorBoard / MLflow when they are on."""
        rows = [_sample_record(step, i, row) for i, row in enumerate(rows)]
        if not rows:
            return
        if self.cfg.jsonl is not None:
            with open(self.samples_path, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        table = [_flat_row(row) for row in rows]
        columns = list(dict.fromkeys(k for row in table for k in row))
        if self.wandb_run is not None:
            import wandb

            data = [[row.get(c) for c in columns] for row in table]
            self.wandb_run.log({"samples": wandb.Table(columns=columns, data=data)}, step=step)
        if self.tensorboard is not None:
            self.tensorboard.log_table(step, columns, table)
        if self.mlflow is not None:
            self.mlflow.log_table(step, columns, table)

    def _console(self, step: int, metrics: dict) -> None:
        parts = [f"step {step}/{self.total_steps}"]
        for key, label in CONSOLE_KEYS:
            if key in metrics and isinstance(metrics[key], (int, float)):
                parts.append(f"{label}={metrics[key]:.4g}")
        if "perf/old_logprob_pass" in metrics:  # rlpost.algorithms.on_policy
            parts.append("old_lp=" + ("pass" if metrics["perf/old_logprob_pass"] else "reused"))
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
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.close()


def _init_wandb(cfg: LoggerConfig, output_dir: Path, run_config: dict):
    import wandb

    mode = cfg.wandb.mode
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or os.environ.get("WANDB_MODE") == "online"
        mode = os.environ.get("WANDB_MODE", "online" if has_key else "offline")
    # A stable id stored in the run directory makes a resumed run continue the same
    # wandb run instead of starting a new one.
    id_file = output_dir / "wandb_id"
    # Our own id: wandb 0.31 dropped wandb.util.generate_id (8 lowercase alphanumerics, as wandb's).
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, id=run_id, resume="allow",
                      dir=str(output_dir), mode=mode, config=run_config)


# ------------------------------------------------------------------ samples

_SAMPLE_TEXT_CHARS = 4000  # longer prompts/completions are cut in samples.jsonl and tables


def trajectory_rows(trajectories, limit: int = 8) -> list[dict]:
    """``log_samples`` rows for up to ``limit`` trajectories (``rlpost.types.Trajectory``),
    taking the first sample of every group before any second one, so the rows show
    as many different prompts as possible."""
    seen: dict[int, int] = {}
    rank = []  # (position within its group, group) of each trajectory
    for t in trajectories:
        rank.append((seen.get(t.group_index, 0), t.group_index))
        seen[t.group_index] = rank[-1][0] + 1
    order = sorted(range(len(trajectories)), key=rank.__getitem__)
    rows = []
    for i in order[:limit]:
        t = trajectories[i]
        rows.append({"prompt": t.prompt.question, "completion": t.completion.text, "answer": t.prompt.answer,
                     "reward": t.reward.total, "components": dict(t.reward.components), "error": t.reward.error,
                     "finish_reason": t.completion.finish_reason, "uid": t.prompt.uid})
    return rows


def _sample_record(step: int, index: int, row: dict) -> dict:
    if not isinstance(row, dict) or "completion" not in row or "reward" not in row:
        raise ValueError(f"log_samples row {index} must be a dict with at least 'completion' and 'reward' "
                         f"(and usually 'prompt', 'answer', 'components'); got {row!r:.200}")
    record = {"step": step}
    for key, value in row.items():
        if isinstance(value, str) and len(value) > _SAMPLE_TEXT_CHARS:
            value = value[:_SAMPLE_TEXT_CHARS] + "..."
        elif isinstance(value, dict):
            value = {str(k): _clean(v) for k, v in value.items()}
        record[key] = _clean(value)
    return record


def _flat_row(record: dict) -> dict:
    """A table row: ``components`` become ``reward/<name>`` columns, other values stay."""
    flat = {k: v for k, v in record.items() if k != "components"}
    for name, value in (record.get("components") or {}).items():
        flat[f"reward/{name}"] = value
    return flat


def _line_step(line: str) -> int:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a half-written last line of an interrupted run
        return 1 << 62


# ------------------------------------------------------------------ tensorboard & mlflow


class _TensorboardSink:
    """Scalars per step in TensorBoard event files; sample tables as markdown text."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError("logger=[...,tensorboard] needs the tensorboard package: pip install tensorboard "
                              f"({exc})") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_table(self, step: int, columns: list[str], rows: list[dict]) -> None:
        def cell(value) -> str:
            text = f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "")
            return text.replace("|", "\\|").replace("\n", "<br>")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
        self.writer.add_text("samples", "\n".join(lines), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MlflowSink:
    """One MLflow run per output_dir: its id is kept in ``<output_dir>/mlflow_run_id``
    so a resumed run logs into the same MLflow run (like wandb above).

    The default store is sqlite in the run directory rather than MLflow's ``file:``
    store: since MLflow 3.x the file store is in maintenance mode and refuses to open
    unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set."""

    def __init__(self, cfg: LoggerConfig, output_dir: Path, run_config: dict):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError("logger=[...,mlflow] needs the mlflow package: pip install mlflow-skinny "
                              f"sqlalchemy alembic ({exc})") from exc
        mc = cfg.mlflow
        output_dir = Path(output_dir).resolve()
        uri = mc.tracking_uri or f"sqlite:///{output_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        id_file = output_dir / "mlflow_run_id"
        self.run_id = id_file.read_text().strip() if id_file.exists() else None
        if self.run_id is not None and _mlflow_run_exists(self.client, self.run_id):
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(mc.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None if mc.tracking_uri else (output_dir / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(mc.experiment, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=mc.run_name).info.run_id
        id_file.write_text(self.run_id)
        self._log_params(run_config)

    def _log_params(self, run_config: dict) -> None:
        from mlflow.entities import Param

        flat = _flatten(run_config)
        params = [Param(k, str(v)[:500]) for k, v in flat.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_mlflow_key(k), float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for start in range(0, len(batch), 1000):  # MLflow's per-batch metric limit
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def log_table(self, step: int, columns: list[str], rows: list[dict]) -> None:
        import pandas as pd

        frame = pd.DataFrame([[row.get(c) for c in columns] for row in rows], columns=columns)
        self.client.log_table(self.run_id, frame, artifact_file=f"samples/step_{step:06d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


def _mlflow_key(key: str) -> str:
    # MLflow keys allow letters, digits and _ - . space : / only ("eval/pass@4" -> "eval/pass_4").
    return re.sub(r"[^\w\-. :/]", "_", key)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
