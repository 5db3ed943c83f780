"""rlpost.data.prompt_cache: a hit only when nothing the prompts depend on changed."""

import dataclasses
import json
import os

import pytest

from rlpost.config.schema import DataConfig
from rlpost.data import prompt_cache


@pytest.fixture()
def setup(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text('{"vocab": 1}')
    (model / "chat_template.jinja").write_text("{{ messages }}")
    (model / "model.safetensors").write_bytes(b"weights")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n")
    cfg = DataConfig(source="files", train_files=[str(data)], val_files=[])
    return cfg, model, data, tmp_path


def test_the_same_inputs_give_the_same_key_and_a_saved_entry_loads(setup):
    cfg, model, _, tmp = setup
    key = prompt_cache.cache_key(cfg, str(model), 0, tmp)
    assert key is not None and key == prompt_cache.cache_key(cfg, str(model), 0, tmp)
    assert prompt_cache.load(tmp / "c", key) is None
    prompt_cache.save(tmp / "c", key, {"prompts": [1, 2]})
    assert prompt_cache.load(tmp / "c", key) == {"prompts": [1, 2]}
    assert not list((tmp / "c").glob("*.tmp"))


def test_every_input_changes_the_key(setup):
    cfg, model, data, tmp = setup
    base = prompt_cache.cache_key(cfg, str(model), 0, tmp)
    assert prompt_cache.cache_key(cfg, str(model), 1, tmp) != base  # seed
    assert prompt_cache.cache_key(dataclasses.replace(cfg, max_prompt_tokens=7), str(model), 0, tmp) != base
    assert prompt_cache.cache_key(dataclasses.replace(cfg, system_prompt="Be brief."), str(model), 0, tmp) != base
    (model / "chat_template.jinja").write_text("{{ messages }}!")  # the template
    changed_template = prompt_cache.cache_key(cfg, str(model), 0, tmp)
    assert changed_template != base
    (model / "model.safetensors").write_bytes(b"new weights")  # weights do not template prompts
    assert prompt_cache.cache_key(cfg, str(model), 0, tmp) == changed_template
    data.write_text(json.dumps({"prompt": "2+2", "answer": "4"}) + "\n")
    os.utime(data, ns=(1, 1))  # the data file: size or mtime
    assert prompt_cache.cache_key(cfg, str(model), 0, tmp) != changed_template


def test_inputs_the_cache_cannot_see_are_not_cached(setup):
    cfg, model, _, tmp = setup
    assert prompt_cache.cache_key(cfg, "Qwen/Qwen2.5-0.5B", 0, tmp) is None  # a hub id
    assert prompt_cache.cache_key(dataclasses.replace(cfg, row_fn="my_rows:fn"), str(model), 0, tmp) is None
    assert prompt_cache.cache_key(DataConfig(source="hf", hf_dataset="openai/gsm8k"), str(model), 0, tmp) is None
    missing = dataclasses.replace(cfg, train_files=[str(tmp / "nope.jsonl")])
    assert prompt_cache.cache_key(missing, str(model), 0, tmp) is None  # load_prompts reports it
    assert prompt_cache.load(tmp, None) is None


def test_a_damaged_entry_is_a_miss(setup):
    cfg, model, _, tmp = setup
    key = prompt_cache.cache_key(cfg, str(model), 0, tmp)
    (tmp / "c").mkdir()
    (tmp / "c" / f"{key}.pkl").write_bytes(b"\x80\x04truncated")
    assert prompt_cache.load(tmp / "c", key) is None
