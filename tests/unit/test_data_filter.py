"""The difficulty filter's pure parts (rlpost.data.filter, rlpost.data.filter_output),
without Ray: reading and dropping, sampling with the tiny model, scoring against known
pass rates, the band, shards and the resume guard. The Ray Data pipeline itself is in
tests/integration/test_data_filter_ray.py."""

import json
from collections import Counter
from pathlib import Path

import pytest

from rlpost.config.load import load_config
from rlpost.config.schema import parse_band
from rlpost.data.dataset import load_prompts
from rlpost.data.filter import PromptSampler, fingerprint, prepare_prompts, score_rows
from rlpost.data.filter_output import FilterOutput, in_band
from rlpost.errors import ConfigError

THIS_FILE = Path(__file__).resolve()
_calls: Counter = Counter()


def cyclic_reward(prompt, completion, ground_truth, metadata):
    """Passes the first ``id % 3`` of each prompt's samples, whatever the text: with k=2
    prompt ids 0..5 have pass rates 0, 1/2, 1, 0, 1/2, 1. The count cycles modulo k=2,
    so it stays aligned when a prompt's k samples are scored again (a resumed shard)."""
    i = metadata["id"]
    index = _calls[i] % 2
    _calls[i] += 1
    return 1.0 if index < i % 3 else 0.0


def write_rows(path: Path) -> Path:
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "id": i} for i in range(6)]
    rows += [{"prompt": "What is 0 + 1?", "answer": "1", "id": 6},  # duplicate of id 0
             {"prompt": "What is 7 + 1?", "id": 7},  # malformed: no answer
             {"prompt": "1" * 300, "answer": "1", "id": 8}]  # over max_prompt_tokens (digits: a token each)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, *extra: str):
    return load_config(["+recipe=grpo_math", "rollout.engine=hf", "data.source=files",
                        f"data.train_files=[{write_rows(tmp_path / 'rows.jsonl')}]", f"reward.fn='{THIS_FILE}:cyclic_reward'",
                        "filter.k=2", "filter.shard_size=4", "filter.batch_size=3", "rollout.max_new_tokens=6",
                        f"filter.output={tmp_path / 'out'}", *extra])


@pytest.fixture(scope="module")
def tiny():
    from rlpost.models.loading import load_tokenizer, resolve_model_path

    path = resolve_model_path("builtin:tiny-math")
    return path, load_tokenizer(path)


def test_prepare_counts_drops_and_assigns_shards(tmp_path, tiny):
    prompts, counts = prepare_prompts(config(tmp_path), tiny[1], tmp_path)
    assert (counts.loaded, counts.malformed, counts.too_long, counts.duplicates, counts.prompts) == (9, 1, 1, 1, 6)
    assert [json.loads(p["metadata"])["id"] for p in prompts] == [0, 1, 2, 3, 4, 5]
    assert [p["shard"] for p in prompts] == [0, 0, 0, 0, 1, 1]  # shard_size=4
    assert [p["batch"] for p in prompts] == [0, 0, 0, 1, 2, 2]  # batch_size=3, never across a shard
    assert json.loads(prompts[1]["messages"]) == [{"role": "user", "content": "What is 1 + 1?"}]
    limited, counts = prepare_prompts(config(tmp_path, "filter.limit=2"), tiny[1], tmp_path)
    assert len(limited) == 2 and counts.loaded == 2


def test_sampler_and_scorer_give_known_pass_rates(tmp_path, tiny):
    cfg = config(tmp_path)
    prompts, _ = prepare_prompts(cfg, tiny[1], tmp_path)
    sampled = PromptSampler(cfg, tiny[0])(prompts)
    assert all(len(r["completions"]) == 2 and all(1 <= n <= 6 for n in r["lengths"]) for r in sampled)
    assert "prompt_ids" not in sampled[0]
    _calls.clear()
    scored = score_rows(sampled, cfg.reward)
    assert [r["pass_rate"] for r in scored] == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    assert [r["mean_reward"] for r in scored] == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    assert all(r["num_scored"] == 2 and r["mean_length"] == sum(s["lengths"]) / 2 for r, s in zip(scored, sampled))
    # The same batch samples the same completions (seeded per batch), on another engine too.
    assert PromptSampler(cfg, tiny[0], replica=1)(prompts) == sampled


def test_failed_rewards_leave_a_prompt_unscored_not_failed(tmp_path, tiny):
    cfg = config(tmp_path, "reward.fn=rlpost.rewards.math:math_reward")
    row = {"uid": "train-0", "position": 0, "shard": 0, "messages": "[]", "question": "q", "answer": "1",
           "metadata": "{}", "completions": ["1", "2"], "lengths": [1, 1]}
    [scored] = score_rows([row], cfg.reward)
    assert scored["pass_rate"] is not None and scored["num_scored"] == 2
    bad = load_config(["reward.fn=" + f"'{THIS_FILE}:cyclic_reward'"]).reward  # metadata has no "id": KeyError
    [unscored] = score_rows([row], bad)
    assert unscored["pass_rate"] is None and unscored["num_scored"] == 0 and not in_band(None, (0.0, 1.0))


@pytest.mark.parametrize("text, band", [("0.1:0.9", (0.1, 0.9)), ("0:1", (0.0, 1.0)), ("0.5:0.5", (0.5, 0.5))])
def test_band_parses(text, band):
    assert parse_band(text) == band


@pytest.mark.parametrize("text", ["0.9:0.1", "0.5", "a:b", "-0.1:0.5", "0:1.5"])
def test_bad_band_names_the_key(text):
    with pytest.raises(ConfigError, match="filter.keep"):
        parse_band(text)
    with pytest.raises(ConfigError, match="filter.keep"):
        load_config([f"filter.keep='{text}'"])


def test_band_ends_are_included():
    assert in_band(0.1, (0.1, 0.9)) and in_band(0.9, (0.1, 0.9))
    assert not in_band(0.0, (0.1, 0.9)) and not in_band(1.0, (0.1, 0.9))


def test_output_shards_kept_file_reads_back_as_training_data(tmp_path, tiny):
    cfg = config(tmp_path)
    prompts, counts = prepare_prompts(cfg, tiny[1], tmp_path)
    out = FilterOutput(tmp_path / "out", fingerprint(cfg, tiny[0]))
    rates = [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    scored = [{**{k: v for k, v in p.items() if k != "prompt_ids"}, "pass_rate": r, "mean_reward": r,
               "mean_length": 3.0, "num_scored": 2} for p, r in zip(prompts, rates)]
    out.write_shard(1, scored[4:][::-1])  # rows arrive in any order; the shard is in input order
    out.write_shard(0, scored[:4])
    assert out.done_shards() == {0, 1} and not list((tmp_path / "out" / "shards").glob("*.tmp"))
    report = out.finish((0.25, 0.75), counts, sampled=6, seconds=1.0)
    assert report["kept"] == 2 and report["scored"] == 6
    assert report["pass_rate_histogram"]["0.0-0.1"] == 2 and report["pass_rate_histogram"]["0.9-1.0"] == 2

    samples, data_report = load_prompts(load_config(["data.source=files", f"data.train_files=[{tmp_path / 'out' / 'kept.parquet'}]"]).data,
                                        tiny[1], "train", 0, tmp_path)
    assert data_report.kept == 2
    assert [s.question for s in samples] == ["What is 1 + 1?", "What is 4 + 1?"]
    assert [s.answer for s in samples] == ["2", "5"]
    assert samples[0].metadata == {"id": 1, "uid": "train-1", "pass_rate": 0.5, "mean_reward": 0.5,
                                   "mean_length": 3.0, "num_scored": 2}
    # The training prompt is the one the filter sampled with (same chat template, no system prompt set).
    assert list(samples[0].prompt_ids) == prompts[1]["prompt_ids"]


def test_rerun_with_other_settings_is_refused(tmp_path, tiny):
    cfg = config(tmp_path)
    out = FilterOutput(tmp_path / "out", fingerprint(cfg, tiny[0]))
    out.write_shard(0, [])
    FilterOutput(tmp_path / "out", fingerprint(config(tmp_path, "filter.keep=0.5:1"), tiny[0]))  # the band may change
    with pytest.raises(ConfigError, match="sampling"):
        FilterOutput(tmp_path / "out", fingerprint(config(tmp_path, "filter.k=3"), tiny[0]))


def test_filter_needs_an_output_folder(tmp_path):
    from rlpost.data.filter_run import run_filter

    with pytest.raises(ConfigError, match="filter.output"):
        run_filter(load_config(["+recipe=grpo_math"]))


def test_rlpost_data_filter_routes_and_reports_config_errors(capsys):
    from rlpost.launch.cli import main

    assert main(["data", "filter", "+recipe=grpo_math"]) == 2  # no filter.output: stops before reading
    assert "filter.output" in capsys.readouterr().err
    assert main(["data", "filter", "--keep", "0.9:0.1", "--output", "x"]) == 2
    assert "filter.keep" in capsys.readouterr().err
    assert main(["data", "sort"]) == 2 and "filter" in capsys.readouterr().err


def test_progress_writes_a_shard_once_all_its_prompts_are_in(capsys):
    import time

    from rlpost.data.filter_run import _ShardProgress
    from rlpost.errors import WorkerError

    written = {}

    class Recorder:  # stands in for FilterOutput
        def write_shard(self, shard, rows):
            written[shard] = [r["position"] for r in rows]

    progress = _ShardProgress(Recorder(), {0: 2, 1: 1}, 3, time.perf_counter())
    progress.add({"shard": 1, "position": 2})
    progress.add({"shard": 0, "position": 1})
    assert written == {1: [2]}  # shard 0 still misses a prompt
    with pytest.raises(WorkerError, match="missing"):
        progress.check_complete()
    progress.add({"shard": 0, "position": 0})
    assert written == {1: [2], 0: [1, 0]}
    progress.check_complete()
    assert "shard 0 written; 3/3 prompts" in capsys.readouterr().out
