"""Tracker sinks behind the run report: samples.jsonl, TensorBoard and MLflow read
back with their own readers, and the logger config sections kept in step with
their YAML and the docs."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from rlpost.config.load import config_dir, load_config
from rlpost.config.schema import (
    JsonlLogConfig,
    LoggerConfig,
    MlflowLogConfig,
    TensorboardLogConfig,
)
from rlpost.tracking import Tracker, trajectory_rows
from rlpost.types import Completion, PromptSample, Reward, Trajectory

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((config_dir() / "logger").glob("*.yaml")), ids=lambda p: p.stem)
def test_logger_yaml_matches_its_dataclass_and_the_docs(path):
    (section, values), = yaml.safe_load(path.read_text()).items()
    assert section == path.stem
    cls = {f.name: f.type for f in dataclasses.fields(LoggerConfig)}[section]
    cls = eval(cls, vars(__import__("rlpost.config.schema", fromlist=["x"])))  # "X | None" annotation
    dataclass_type = next(t for t in cls.__args__ if t is not type(None))
    assert set(values) == {f.name for f in dataclasses.fields(dataclass_type)}
    assert values == dataclasses.asdict(dataclass_type())  # YAML defaults == dataclass defaults
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for key in values:
        assert f"`logger.{section}." in doc and key in doc, f"docs/configuration.md does not mention logger.{section}.{key}"


def test_new_backends_compose_from_the_command_line():
    cfg = load_config(["logger=[console,jsonl,tensorboard,mlflow]", "logger.mlflow.experiment=exp"])
    assert cfg.logger.tensorboard == TensorboardLogConfig()
    assert cfg.logger.mlflow.experiment == "exp" and cfg.logger.mlflow.tracking_uri is None


def _traj(group, k, reward, text):
    prompt = PromptSample(uid=f"train-{group}", prompt_ids=(1, 2), question=f"q{group}", answer=str(group))
    completion = Completion(token_ids=(3,), logprobs=(-0.1,), text=text, finish_reason="stop", policy_version=0)
    return Trajectory(prompt=prompt, completion=completion,
                      reward=Reward(total=reward, components={"accuracy": reward}), group_index=group)


def test_trajectory_rows_take_one_sample_per_group_first():
    trajs = [_traj(g, k, float(k == 0), f"g{g}s{k}") for g in range(3) for k in range(2)]
    rows = trajectory_rows(trajs, limit=4)
    assert [r["completion"] for r in rows] == ["g0s0", "g1s0", "g2s0", "g0s1"]
    assert rows[0] == {"prompt": "q0", "completion": "g0s0", "answer": "0", "reward": 1.0,
                       "components": {"accuracy": 1.0}, "error": None, "finish_reason": "stop", "uid": "train-0"}


def test_log_samples_appends_and_truncate_after_drops_later_steps(tmp_path):
    tracker = Tracker(LoggerConfig(jsonl=JsonlLogConfig()), tmp_path, 3, {})
    for step in (1, 2, 3):
        tracker.log(step, {"reward/mean": step / 10})
        tracker.log_samples(step, [{"prompt": "p", "completion": f"c{step}", "answer": "a", "reward": float("nan"),
                                    "components": {"format": 0.5}}])
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["completion"], r["reward"]) for r in rows] == [(1, "c1", "nan"), (2, "c2", "nan"),
                                                                          (3, "c3", "nan")]
    assert rows[0]["components"] == {"format": 0.5}
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"step": 4, "compl')  # an interrupted write
    tracker.truncate_after(2)
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(ValueError, match="'completion' and 'reward'"):
        tracker.log_samples(5, [{"prompt": "p"}])


def test_tensorboard_and_mlflow_read_back(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggerConfig(tensorboard=TensorboardLogConfig(), mlflow=MlflowLogConfig(run_name="t"))
    logged = {1: {"reward/mean": 0.25, "policy/kl": 0.5}, 2: {"reward/mean": 0.75, "eval/pass@4": 1.0}}
    tracker = Tracker(cfg, tmp_path, 2, {"trainer": {"lr": 1e-4}, "model": {"path": "builtin:tiny-math"}})
    for step, metrics in logged.items():
        tracker.log(step, {**metrics, "note": "strings are not scalars"})
    tracker.log_samples(2, [{"prompt": "1+1?", "completion": "\\boxed{2}", "answer": "2", "reward": 1.0,
                             "components": {"accuracy": 1.0}}])
    tracker.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.25), (2, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("policy/kl")] == [(1, 0.5)]
    assert "samples/text_summary" in events.Tags()["tensors"]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "mlflow_run_id").read_text()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params["trainer.lr"] == "0.0001"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "reward/mean")] == [(1, 0.25), (2, 0.75)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/pass_4")] == [(2, 1.0)]
    table = json.loads(Path(client.download_artifacts(run_id, "samples/step_000002.json", str(tmp_path))).read_text())
    assert [dict(zip(table["columns"], row)) for row in table["data"]] == [
        {"step": 2, "prompt": "1+1?", "completion": "\\boxed{2}", "answer": "2", "reward": 1.0, "reward/accuracy": 1.0}]

    # A resumed run logs into the same MLflow run.
    resumed = Tracker(cfg, tmp_path, 3, {})
    resumed.log(3, {"reward/mean": 1.0})
    resumed.close()
    assert resumed.mlflow.run_id == run_id
    assert [m.step for m in client.get_metric_history(run_id, "reward/mean")] == [1, 2, 3]
    assert not math.isnan(client.get_metric_history(run_id, "reward/mean")[-1].value)
