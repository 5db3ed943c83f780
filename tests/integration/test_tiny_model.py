"""The built-in tiny model: build, cache, load with plain transformers, determinism.

Uses a shrunken build spec (a few SFT steps) so the file runs in seconds; the real
spec's quality is measured by scripts/eval_tiny_model.py, not asserted here.
"""

import dataclasses
import threading

import pytest
import torch

from rlpost.errors import ModelError
from rlpost.models import tiny
from rlpost.models.loading import load_tokenizer, resolve_model_path

SMALL = dataclasses.replace(tiny.TinyMathSpec(), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                            num_kv_heads=1, tokenizer_texts=300, sft_steps=3, sft_problems_per_step=4,
                            sft_drills_per_step=2, sft_warmup_steps=1)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLPOST_CACHE", str(root))  # the default cache root honours RLPOST_CACHE
        path = tiny.build_tiny_model(seed=0, spec=SMALL)
    assert path.parent == root / "models" and path.name.startswith("tiny-math-")
    return root, path


def test_folder_loads_with_transformers(built):
    from transformers import AutoModelForCausalLM

    _, path = built
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.tie_word_embeddings
    tokenizer = load_tokenizer(str(path))
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_chat_template_round_trip(built):
    _, path = built
    tokenizer = load_tokenizer(str(path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tom has 12 apples."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTom has 12 apples.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    special = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert special <= set(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "system\nBe brief.\nuser\nTom has 12 apples.\nassistant\n"


def test_digits_are_single_tokens(built):
    _, path = built
    tokenizer = load_tokenizer(str(path))
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("12345 + 678 = 13023", add_special_tokens=False)]
    assert [p for p in pieces if p.strip().isdigit()] == list("12345678") + list("13023")
    assert all(len(p.strip()) <= 1 for p in pieces if any(c.isdigit() for c in p))


def test_saved_tokenizer_matches_built_one(built):
    # AutoTokenizer rebuilds a qwen2 folder's tokenizer as Qwen2Tokenizer; it must
    # encode exactly as the tokenizer the model was trained with.
    from tokenizers import Tokenizer

    from rlpost.data.math_gen import generate_problems, solution_text

    _, path = built
    loaded = load_tokenizer(str(path))
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    for p in generate_problems(30, 6, 0, "t", heldout=False):
        text = f"{p.question} {solution_text(p)} café 你好\n\n  x"
        assert loaded.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids


def test_same_seed_same_weights_and_cache_hit(built, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    root, path = built
    again = tiny.build_tiny_model(seed=0, spec=SMALL, root=tmp_path)
    assert again != path
    a, b = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (path / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()

    other = tiny.build_tiny_model(seed=1, spec=SMALL, root=tmp_path)
    c = load_file(other / "model.safetensors")
    assert other != again and not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])

    def fail(*args):
        raise AssertionError("cache miss: model rebuilt")

    monkeypatch.setattr(tiny, "_build_into", fail)
    assert tiny.build_tiny_model(seed=0, spec=SMALL, root=root) == path


def test_concurrent_builds_build_once(tmp_path, monkeypatch):
    calls = []
    real = tiny._build_into

    def counting(out, seed, spec):
        calls.append(seed)
        real(out, seed, spec)

    monkeypatch.setattr(tiny, "_build_into", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(tiny.build_tiny_model(2, SMALL, tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert calls == [2]
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [results[0].name]


def test_resolve_builtin_builds_with_run_seed(monkeypatch, tmp_path):
    seeds = []
    monkeypatch.setattr(tiny, "build_tiny_model", lambda seed: seeds.append(seed) or tmp_path)
    assert resolve_model_path("builtin:tiny-math", seed=5) == str(tmp_path)
    assert seeds == [5]


def test_resolve_local_folder_and_errors(built, tmp_path, monkeypatch):
    _, path = built
    assert resolve_model_path(str(path)) == str(path)
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="unknown built-in"):
        resolve_model_path("builtin:huge")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="builtin:tiny-math"):
        resolve_model_path("nobody-xyz/no-such-model-rlpost")
