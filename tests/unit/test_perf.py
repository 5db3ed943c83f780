"""Model FLOPs, MFU and the thread rule, by hand (rlpost.perf, rlpost.threads)."""

from __future__ import annotations

import pytest

from rlpost.perf import StepPerf, matmul_params, step_flops
from rlpost.threads import resolve_threads


def test_step_flops_by_hand():
    # 6 * 1000 * 10 + 2 * 1000 * 5 + 2 * 1000 * 10 = 60000 + 10000 + 20000
    assert step_flops(1000, trained_tokens=10, generated_tokens=5, extra_forward_tokens=10) == 90_000
    assert step_flops(1000, trained_tokens=10, generated_tokens=0) == 60_000


def test_step_perf_metrics_by_hand():
    perf = StepPerf(n_params=1000, peak=1e6, devices=2)
    m = perf.metrics(trained_tokens=10, generated_tokens=5, extra_forward_tokens=10, step_s=0.5)
    assert m["perf/mfu"] == pytest.approx(90_000 / (0.5 * 1e6))  # 0.18
    assert m["perf/tokens_per_s_per_device"] == pytest.approx(10 / 0.5 / 2)
    assert m["perf/tflops_per_step"] == pytest.approx(9e-8)


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_params_of_a_small_qwen2_by_hand(tmp_path, tied):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, tie_word_embeddings=tied).save_pretrained(tmp_path)
    # head_dim 4. q 8x8 + 8 bias = 72; k, v 8x4 + 4 = 36 each; o 8x8 = 64; MLP 3 x 8 x 12 = 288;
    # two layer norms 16; final norm 8; LM head 16 x 8 = 128 (tied or not); the input
    # embedding (16 x 8) is a lookup and is not counted.
    assert matmul_params(str(tmp_path)) == 72 + 36 + 36 + 64 + 288 + 16 + 8 + 128


@pytest.mark.parametrize("mode, cpus, ranks, replicas, given, expected", [
    ("sync", 2, 1, 1, (0, 0), (2, 2)),  # they take turns: each side gets the node
    ("sync", 8, 2, 4, (0, 0), (4, 2)),
    ("sync", 1, 2, 2, (0, 0), (1, 1)),  # never fewer than one
    ("one_step_off", 2, 1, 1, (0, 0), (1, 1)),  # at once: split
    ("async", 8, 1, 2, (0, 0), (4, 2)),
    ("async", 7, 1, 1, (0, 0), (3, 4)),
    ("sync", 2, 1, 1, (3, 1), (3, 1)),  # numbers are taken as given
])
def test_thread_rule(mode, cpus, ranks, replicas, given, expected):
    assert resolve_threads(mode, cpus, ranks, replicas, *given) == expected


@pytest.mark.parametrize("cap, expected", [
    (None, (8, 8)), (16, (8, 8)), (3, (3, 3)), (1, (1, 1)),  # OMP_NUM_THREADS caps auto per process
])
def test_auto_threads_are_capped_by_the_environment(cap, expected):
    assert resolve_threads("sync", 8, 1, 1, cap=cap) == expected
    assert resolve_threads("sync", 8, 1, 1, 2, 3, cap=cap) == (2, 3)  # numbers are taken as given


def test_the_cap_is_read_from_omp_num_threads(monkeypatch):
    from rlpost.threads import env_thread_cap

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert env_thread_cap() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert env_thread_cap() is None
