"""rollout.engine=auto: which engine for which machine and model size."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rlpost.engines import AUTO_VLLM_MIN_PARAMS_CPU, choose_auto_engine, count_parameters, resolve_rollout_engine


def test_without_vllm_auto_is_hf_whatever_the_size_or_device():
    for gpu in (False, True):
        for params in (None, 1, 10**10):
            engine, reason = choose_auto_engine(vllm_installed=False, gpu=gpu, params=params)
            assert engine == "hf"
            assert "not installed" in reason


def test_on_gpu_auto_is_vllm_even_for_a_tiny_model():
    assert choose_auto_engine(vllm_installed=True, gpu=True, params=600_000)[0] == "vllm"


@pytest.mark.parametrize("params, engine", [
    (600_000, "hf"),                           # the built-in tiny model
    (AUTO_VLLM_MIN_PARAMS_CPU - 1, "hf"),
    (AUTO_VLLM_MIN_PARAMS_CPU, "vllm"),
    (100_000_000, "vllm"),
])
def test_on_cpu_the_model_size_decides(params, engine):
    chosen, reason = choose_auto_engine(vllm_installed=True, gpu=False, params=params)
    assert chosen == engine
    assert f"{params / 1e6:.1f}M parameters" in reason


def test_unknown_size_keeps_vllm_where_installed():
    assert choose_auto_engine(vllm_installed=True, gpu=False, params=None)[0] == "vllm"


def test_count_parameters_reads_every_safetensors_file(tmp_path):
    # 3*4 + 5 = 17 elements in the first file, 2*2*2 = 8 in the second: 25.
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "model-1.safetensors"))
    save_file({"c": torch.zeros(2, 2, 2)}, str(tmp_path / "model-2.safetensors"))
    assert count_parameters(str(tmp_path)) == 25


def test_count_parameters_without_weights_is_unknown(tmp_path):
    assert count_parameters(str(tmp_path)) is None
    assert count_parameters(None) is None


def test_names_other_than_auto_pass_through():
    for name in ("hf", "vllm", "fake"):
        assert resolve_rollout_engine(name, "/nonexistent") == name
