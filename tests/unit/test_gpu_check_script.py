"""The CPU-side parts of ``scripts/gpu_check.py``: arguments, the offline fallback to a
locally built Qwen2, its parameter count, and the train command it runs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(gpu_check):
    args = gpu_check.parse_args(["--steps", "3", "--tiny"])
    assert args.steps == 3 and args.tiny and args.model == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "1"])


def test_offline_builds_a_local_qwen2(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert gpu_check.main(["--tiny", "--build-only", "--out", str(tmp_path)]) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reply["source"] == "local-random"
    model = Path(reply["model"])
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 2
    # By hand, hidden 64, 2 layers, 4 heads / 2 KV heads (head_dim 16), MLP 128, vocab 512, tied head:
    # embed 512*64 = 32768; per layer q 64*64+64, k and v 64*32+32 each, o 64*64, MLP 3*64*128,
    # two norms 2*64 = 37120; final norm 64. 32768 + 2*37120 + 64 = 107072.
    assert gpu_check.param_count(str(model)) == 107072
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    assert len(tokenizer) <= config["vocab_size"]


def test_train_commands(gpu_check, tmp_path):
    colocated = gpu_check.train_command("/m", tmp_path / "c", 4, colocate=True)
    assert colocated[:3] == [sys.executable, "-m", "rlpost.train"]
    assert "rollout.colocate=true" in colocated and "rollout.engine=vllm" in colocated
    assert "trainer.total_steps=4" in colocated
    # Every override must be a key the config accepts.
    from rlpost.config.load import load_config

    load_config([a for a in gpu_check.train_command("/m", tmp_path / "d", 4, colocate=False)[3:]])
