"""The run report of a real (short) run: the in-process controller with the FSDP2
engine, HF rollout engine and tiny model writes metrics.jsonl and samples.jsonl;
the rendered page embeds exactly those values, and headless Chromium opens it
without a script error and decodes every plot."""

import json
import math
import re
import shutil
import socket
import subprocess

import pytest

from rlpost.checkpoint import CheckpointManager
from rlpost.config.load import load_config
from rlpost.config.schema import JsonlLogConfig, LoggerConfig
from rlpost.step.controller import Controller
from rlpost.data.dataset import load_prompts
from rlpost.data.stream import PromptStream
from rlpost.distributed import destroy_default_group, init_default_group
from rlpost.engines.fsdp import FSDPEngine
from rlpost.engines.hf_rollout import HFRolloutEngine
from rlpost.local import LocalRewardPool, LocalRolloutGroup, LocalTrainerGroup, LocalWeightSync
from rlpost.models.loading import load_tokenizer, resolve_model_path
from rlpost.report import write_report
from rlpost.tracking import Tracker, trajectory_rows
from rlpost.train import cache_root

pytestmark = pytest.mark.integration

STEPS = 4


class SampleLoggingController(Controller):
    """Logs 4 scored completions per step, as a controller calling Tracker.log_samples would."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        collect = self.collector.collect

        def collect_and_log(step, *rest):
            collected = collect(step, *rest)
            self.tracker.log_samples(step, trajectory_rows(collected.trajectories, limit=4))
            return collected

        self.collector.collect = collect_and_log


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_default_group("127.0.0.1", port, 0, 1, timeout_s=120, backend="gloo")
    try:
        model_path = resolve_model_path("builtin:tiny-math")
        cfg = load_config(["+recipe=grpo_math", f"trainer.total_steps={STEPS}", "data.train_batch_size=4",
                           "rollout.n=4", "eval.every=2", "eval.size=16", "trainer.save_every=0",
                           "algorithm.kl_coef=0.01", f"output_dir={out}"])
        tokenizer = load_tokenizer(model_path)
        train, _ = load_prompts(cfg.data, tokenizer, "train", seed=cfg.seed, data_dir=cache_root() / "data")
        val, _ = load_prompts(cfg.data, tokenizer, "val", seed=cfg.seed, data_dir=cache_root() / "data")
        policy = FSDPEngine(model_path, cfg.model, cfg.trainer, seed=cfg.seed)
        reference = FSDPEngine(model_path, cfg.model, None, trainable=False)
        rollout = HFRolloutEngine(model_path, seed=cfg.seed)
        tracker = Tracker(LoggerConfig(jsonl=JsonlLogConfig()), out, STEPS, {})
        (out / "config.yaml").write_text("model:\n  path: builtin:tiny-math\ntrainer:\n  total_steps: 4\n")
        SampleLoggingController(
            cfg, trainer=LocalTrainerGroup(policy, reference, micro_batch_size=cfg.trainer.micro_batch_size),
            rollout=LocalRolloutGroup([rollout]), rewards=LocalRewardPool(cfg.reward),
            weight_sync=LocalWeightSync(policy, [rollout]),
            stream=PromptStream(train, cfg.data.train_batch_size, seed=cfg.seed), val_samples=val[:16],
            tracker=tracker, checkpoints=CheckpointManager(out / "checkpoints", 1), pad_id=tokenizer.pad_token_id,
            use_reference=True).run(0)
        tracker.close()
    finally:
        destroy_default_group()
    return out


def _embedded(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


def _same(a, b) -> bool:
    return (a is None and (b is None or (isinstance(b, float) and math.isnan(b)))) or a == pytest.approx(b)


def test_embedded_series_equal_metrics_jsonl(run_dir):
    page = write_report(run_dir).read_text()
    data = _embedded(page)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(STEPS + 1)) == data["steps"]
    for key in ("reward/mean", "eval/accuracy", "policy/kl", "policy/entropy", "response/length_mean",
                "policy/clip_frac", "timing/rollout_s", "timing/train_s", "timing/eval_s"):
        assert key in data["series"], key
    for key, series in data["series"].items():
        if key == "timing/other_s":
            continue  # derived: checked below
        expected = [(r["step"], r.get(key, 0.0 if key.startswith("timing/") else None)) for r in records
                    if key in r or (key.startswith("timing/") and any(k.startswith("timing/") for k in r))]
        assert series["steps"] == [s for s, _ in expected], key
        assert all(_same(got, want) for got, (_, want) in zip(series["values"], expected)), key
    assert data["series"]["eval/accuracy"]["steps"] == [0, 2, 4]
    # The sample table holds rows from logged steps, taken from samples.jsonl.
    logged = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in logged}) == list(range(1, STEPS + 1))
    assert data["samples"] and all(row in logged for row in data["samples"])


def test_report_on_a_run_in_progress(run_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    data = _embedded(write_report(partial).read_text())
    assert data["steps"] == [0, 1, 2]


def test_chromium_opens_the_report_without_errors(run_dir, tmp_path):
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    if browser is None:
        pytest.skip("no Chromium on PATH (apt-get install -y chromium); the embedded data is checked above")
    path = write_report(run_dir, tmp_path / "report.html")
    data = _embedded(path.read_text())
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # an uncaught error or a console message from the page's script
    assert f'data-report-ready="{len(data["series"])}"' in proc.stdout
    assert f'data-images-decoded="{len(data["panels"])}"' in proc.stdout
    assert proc.stdout.count("<option") == 1 + len({r["step"] for r in data["samples"]})  # "all" + one per step
