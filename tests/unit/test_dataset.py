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


# --- data.source=hf: hub ids and local dataset folders (rlpost.data.sources) ---

def _gsm_rows():
    return [{"question": "Tom has 3 apples and buys 5 more. How many?", "answer": "3 + 5 = 8\n#### 8", "id": 0},
            {"question": "What is 2 + 3?", "answer": None, "id": 1},  # malformed: no answer
            {"question": "What is 4 + 4?", "answer": "#### 8", "id": 2}]


def test_hub_layout_folder_loads_through_hf_dataset(tmp_path, tokenizer):
    # The layout the hub serves (data/<split>-*.parquet), read by datasets.load_dataset offline.
    import datasets

    (tmp_path / "gsm" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(_gsm_rows()).to_parquet(str(tmp_path / "gsm" / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(_gsm_rows()[:1]).to_parquet(str(tmp_path / "gsm" / "data" / "test-00000-of-00001.parquet"))
    cfg = DataConfig(source="hf", hf_dataset=str(tmp_path / "gsm"), hf_split="train", hf_val_split="test",
                     prompt_key="question")
    train, report = load_prompts(cfg, tokenizer, "train", seed=0, data_dir=tmp_path)
    assert (report.loaded, report.kept, report.malformed) == (3, 2, 1)
    assert [s.uid for s in train] == ["train-0", "train-2"] and [s.answer for s in train] == ["8", "8"]
    assert train[0].metadata == {"id": 0}
    val, val_report = load_prompts(cfg, tokenizer, "val", seed=0, data_dir=tmp_path)
    assert [s.question for s in val] == ["Tom has 3 apples and buys 5 more. How many?"] and val_report.kept == 1
    # No val split named: no held-out data, as with source=files and no val_files.
    assert load_prompts(DataConfig(source="hf", hf_dataset=str(tmp_path / "gsm"), prompt_key="question"),
                        tokenizer, "val", 0, tmp_path)[0] == []
    with pytest.raises(DataError, match="validation"):
        load_prompts(DataConfig(source="hf", hf_dataset=str(tmp_path / "gsm"), hf_split="validation"),
                     tokenizer, "train", 0, tmp_path)


def test_save_to_disk_folder_loads_and_row_fn_maps_columns(tmp_path, tokenizer):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(_gsm_rows())}).save_to_disk(str(tmp_path / "saved"))
    mapper = tmp_path / "mapper.py"
    mapper.write_text(
        "def to_prompt(row):\n"
        "    if row['id'] == 2:\n"
        "        raise KeyError('no such column')\n"
        "    return {'prompt': 'Q: ' + row['question'], 'answer': row['answer'], 'level': row['id'] + 1}\n")
    cfg = DataConfig(source="hf", hf_dataset=str(tmp_path / "saved"), row_fn=f"{mapper}:to_prompt")
    samples, report = load_prompts(cfg, tokenizer, "train", seed=0, data_dir=tmp_path)
    # Row 1 has no answer after mapping, row 2 makes the mapper raise: both malformed, the reason kept.
    assert (report.loaded, report.kept, report.malformed) == (3, 1, 2)
    assert samples[0].question == "Q: Tom has 3 apples and buys 5 more. How many?"
    assert samples[0].metadata == {"level": 1}
    assert "KeyError" in report.summary() and "no such column" in report.summary()


def test_uncached_hub_id_offline_says_so(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-hf-home" / "datasets"))
    cfg = DataConfig(source="hf", hf_dataset="rlpost-tests/not-downloaded", hf_config="main")
    with pytest.raises(DataError) as err:
        load_prompts(cfg, tokenizer, "train", seed=0, data_dir=tmp_path)
    msg = str(err.value)
    assert "rlpost-tests/not-downloaded" in msg and "not in the local datasets cache" in msg
    assert "HF_HUB_OFFLINE" in msg and "data.train_files" in msg
