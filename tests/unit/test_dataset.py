import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlpost.config.schema import DataConfig
from rlpost.data.dataset import extract_answer, last_boxed, load_prompts, template_prompt
from rlpost.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    # The built-in tokenizer alone (about a second), not the whole tiny-model build.
    from rlpost.models.tiny import train_tokenizer

    return train_tokenizer(["user assistant system How many apples does Tom have now? 0123456789"] * 20, 300)


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("raw, expected", [
    ("She sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{3} then \\boxed{4}", "4"),
    ("  17 ", "17"),
    (7, "7"),
    (7.0, "7"),
    (2.5, "2.5"),
    (None, None),
    ("", None),
    ("   ", None),
    ("\\boxed{unclosed", None),
    (True, None),
    (float("nan"), None),
    ([1, 2], None),
])
def test_extract_answer(raw, expected):
    assert extract_answer(raw) == expected


def test_last_boxed_nested():
    assert last_boxed("x \\boxed{a{b}c} y") == "a{b}c"
    assert last_boxed("no box") is None


def test_jsonl_counts_malformed_rows(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What is 2 + 3?", "answer": "5", "level": 1},        # kept
        {"prompt": "What is 4 + 4?"},                                   # no answer
        {"prompt": "", "answer": "1"},                                  # empty prompt
        "{not json",                                                    # unparsable line
        {"prompt": 12, "answer": "1"},                                  # prompt not text
        [1, 2],                                                         # not an object
        {"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": 2},  # kept (messages)
    ])
    cfg = DataConfig(source="files", train_files=[path])
    samples, report = load_prompts(cfg, tokenizer, "train", seed=0, data_dir=tmp_path)
    assert (report.loaded, report.kept, report.malformed, report.too_long) == (7, 2, 5, 0)
    assert [s.uid for s in samples] == ["train-0", "train-6"]
    assert [s.answer for s in samples] == ["5", "2"]
    assert samples[1].question == "What is 1 + 1?"
    assert samples[0].metadata == {"level": 1}
    assert "kept 2 of 7" in report.summary()


def test_prompt_is_chat_templated(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "What is 2 + 3?", "gt": "#### 5"}])
    cfg = DataConfig(source="files", train_files=[path], prompt_key="question", answer_key="gt",
                     system_prompt="Be brief.")
    [sample], _ = load_prompts(cfg, tokenizer, "train", seed=0, data_dir=tmp_path)
    assert sample.answer == "5"
    assert sample.question == "What is 2 + 3?"
    text = tokenizer.decode(sample.prompt_ids)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_too_long_prompts_dropped(tmp_path, tokenizer):
    # Digits are one token each, so 300 digits alone exceed a 256-token limit, while
    # the short prompt is at most one token per character (well under 256).
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "1" * 300, "answer": "1"},
        {"prompt": "What is 2 + 3?", "answer": "5"},
    ])
    cfg = DataConfig(source="files", train_files=[path], max_prompt_tokens=256)
    samples, report = load_prompts(cfg, tokenizer, "train", seed=0, data_dir=tmp_path)
    assert (report.loaded, report.kept, report.too_long, report.malformed) == (2, 1, 1, 0)
    assert samples[0].uid == "train-1"
    assert len(samples[0].prompt_ids) <= 256


def test_parquet_gsm8k_style(tmp_path, tokenizer):
    path = tmp_path / "gsm.parquet"
    pq.write_table(pa.table({
        "question": ["Tom has 3 apples and buys 5 more. How many?", "Bad row"],
        "answer": ["3 + 5 = <<3+5=8>>8\n#### 8", None],
    }), path)
    cfg = DataConfig(source="files", train_files=[str(path)], val_files=[str(path)], prompt_key="question")
    samples, report = load_prompts(cfg, tokenizer, "val", seed=0, data_dir=tmp_path)
    assert (report.loaded, report.kept, report.malformed) == (2, 1, 1)
    assert samples[0].answer == "8" and samples[0].uid == "val-0"
    assert list(samples[0].prompt_ids) == template_prompt(
        tokenizer, [{"role": "user", "content": "Tom has 3 apples and buys 5 more. How many?"}])


def test_missing_file_names_path(tmp_path, tokenizer):
    missing = str(tmp_path / "nope.parquet")
    cfg = DataConfig(source="files", train_files=[missing])
    with pytest.raises(DataError, match="nope.parquet"):
        load_prompts(cfg, tokenizer, "train", seed=0, data_dir=tmp_path)


def test_unsupported_extension(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\n")
    with pytest.raises(DataError, match="d.csv"):
        load_prompts(DataConfig(source="files", train_files=[str(path)]), tokenizer, "train", 0, tmp_path)


def test_files_without_val_give_empty_val(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}])
    samples, report = load_prompts(DataConfig(source="files", train_files=[path]), tokenizer, "val", 0, tmp_path)
    assert samples == [] and report.loaded == 0


def test_builtin_source(tmp_path, tokenizer):
    cfg = DataConfig(builtin_train_size=60, builtin_val_size=20, builtin_max_level=2)
    train, train_report = load_prompts(cfg, tokenizer, "train", seed=0, data_dir=tmp_path)
    val, val_report = load_prompts(cfg, tokenizer, "val", seed=0, data_dir=tmp_path)
    assert (train_report.kept, val_report.kept) == (60, 20)
    assert train[5].uid == "train-5" and val[0].uid == "val-0"
    assert {s.metadata["level"] for s in train} == {1, 2}
    assert not {s.question for s in train} & {s.question for s in val}
    assert all(s.answer.isdigit() for s in train + val)
