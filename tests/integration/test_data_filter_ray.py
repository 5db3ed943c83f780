"""``python -m rlpost.data filter`` end to end on Ray Data with the built-in tiny model:
the pass rates of a reward with known answers, the band, and resume per shard. One Ray
instance (4 logical CPUs: a sampler actor, reward tasks) serves the module."""

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlpost.config.load import load_config
from rlpost.data.filter_run import run_filter
from rlpost.errors import ConfigError

pytestmark = pytest.mark.integration
THIS_FILE = Path(__file__).resolve()
_calls: Counter = Counter()


def cyclic_reward(prompt, completion, ground_truth, metadata):
    """Passes the first ``id % 3`` of each prompt's k=2 samples, whatever the text:
    ids 0..5 have pass rates 0, 1/2, 1, 0, 1/2, 1. The k samples of a prompt are scored
    in order in one call of the scoring stage, and the count cycles modulo k, so a
    worker process that scores a prompt again (a resumed shard) stays aligned."""
    i = metadata["id"]
    index = _calls[i] % 2
    _calls[i] += 1
    return 1.0 if index < i % 3 else 0.0


@pytest.fixture(scope="module")
def ray_cluster():
    from rlpost.workers.cluster import start_cluster, stop_cluster

    started = start_cluster(load_config(["ray.num_cpus=4"]))
    yield
    stop_cluster(started)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    # Phrased like the built-in data, so the tiny model answers and stops (lengths vary).
    question = "Tom has {} apples and buys 1 more. How many apples does Tom have now?"
    rows = [{"prompt": question.format(i), "answer": str(i + 1), "id": i} for i in range(6)]
    rows += [{"prompt": question.format(0), "answer": "1", "id": 6},  # duplicate of id 0
             {"prompt": question.format(7), "id": 7}]  # malformed: no answer
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _filter(rows_file: Path, out: Path, *extra: str) -> dict:
    return run_filter(load_config([
        "+recipe=grpo_math", "rollout.engine=hf", "data.source=files", f"data.train_files=[{rows_file}]",
        f"reward.fn='{THIS_FILE}:cyclic_reward'", "reward.workers=1", "filter.k=2", "filter.shard_size=4",
        # 24 tokens: room to stop (an answer takes about 17), so sampled lengths vary
        "filter.batch_size=2", "filter.actors=1", "rollout.max_new_tokens=24", f"filter.output={out}", *extra]))


def _rates(path: Path) -> dict[int, float]:
    return {r["id"]: r["pass_rate"] for r in pq.read_table(path).to_pylist()}


def test_filter_writes_known_pass_rates_keeps_the_band_and_resumes_per_shard(ray_cluster, rows_file, tmp_path, capsys):
    out = tmp_path / "out"
    report = _filter(rows_file, out, "filter.keep=0.25:0.75")
    assert report["read"] | {"first_error": None} == {"loaded": 8, "malformed": 1, "too_long": 0, "duplicates": 1,
                                                      "prompts": 6, "first_error": None}
    assert report["sampled_now"] == 6 and report["scored"] == 6 and report["unscored"] == 0
    assert _rates(out / "shards" / "part-00000.parquet") == {0: 0.0, 1: 0.5, 2: 1.0, 3: 0.0}
    assert _rates(out / "shards" / "part-00001.parquet") == {4: 0.5, 5: 1.0}
    kept = pq.read_table(out / "kept.parquet").to_pylist()
    assert [r["id"] for r in kept] == [1, 4]  # exactly the pass rates in [0.25, 0.75]
    assert all(r["num_scored"] == 2 and 1 <= r["mean_length"] <= 24 for r in kept)
    assert json.loads((out / "report.json").read_text())["kept"] == 2
    assert "shard 1 written" in capsys.readouterr().out

    # Idempotent: the same command samples nothing and leaves the shards as they were.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = _filter(rows_file, out, "filter.keep=0.25:0.75")
    assert again["sampled_now"] == 0 and again["kept"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == stamps

    # Another band only re-selects from the shards.
    wider = _filter(rows_file, out, "filter.keep=0.5:1")
    assert wider["sampled_now"] == 0
    assert [r["id"] for r in pq.read_table(out / "kept.parquet").to_pylist()] == [1, 2, 4, 5]

    # A lost shard (as after an interruption) is sampled again, alone, into the same rows:
    # its engine batches are fixed and seeded by their prompts, so even the sampled
    # lengths (mean_length) come out as in the first run.
    lost = pq.read_table(out / "shards" / "part-00001.parquet").to_pylist()
    (out / "shards" / "part-00001.parquet").unlink()
    resumed = _filter(rows_file, out, "filter.keep=0.5:1")
    assert resumed["sampled_now"] == 2
    assert pq.read_table(out / "shards" / "part-00001.parquet").to_pylist() == lost
    assert _rates(out / "shards" / "part-00001.parquet") == {4: 0.5, 5: 1.0}
    assert (out / "shards" / "part-00000.parquet").stat().st_mtime_ns == stamps["part-00000.parquet"]

    # Other sampling settings would mix two measurements in one folder: refused.
    with pytest.raises(ConfigError, match="sampling"):
        _filter(rows_file, out, "filter.k=3")


def test_cli_runs_the_filter_and_the_result_trains(ray_cluster, rows_file, tmp_path, capsys):
    from rlpost.launch.cli import main
    from rlpost.train import run

    out = tmp_path / "cli"
    argv = ["data", "filter", "+recipe=grpo_math", "rollout.engine=hf", "data.source=files",
            f"data.train_files=[{rows_file}]", f"reward.fn='{THIS_FILE}:cyclic_reward'", "reward.workers=1",
            "filter.k=2", "filter.limit=3", "rollout.max_new_tokens=6", "--keep", "0:1", "--output", str(out)]
    assert main(argv) == 0
    assert [r["id"] for r in pq.read_table(out / "kept.parquet").to_pylist()] == [0, 1, 2]
    # One training step reads the filtered file directly.
    run(load_config([
        "+recipe=grpo_math", "rollout.engine=hf", "data.source=files", f"data.train_files=[{out / 'kept.parquet'}]",
        "data.train_batch_size=2", "rollout.n=2", "rollout.max_new_tokens=6", "eval.every=0",
        "trainer.total_steps=1", "trainer.save_every=0", "reward.workers=1", f"output_dir={tmp_path / 'run'}"]))
    [row] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and (tmp_path / "run" / "final").is_dir()
    assert "kept 3 of 3 rows" in capsys.readouterr().out
