"""In-flight weight updates in the vLLM engine: ``generate`` drives vLLM one engine step
at a time under a ``DecodeGate``, so an update from another thread lands between two
steps; tokens record their version, and ``inflight_kv=recompute`` preempts the running
requests so vLLM re-prefills them with the new weights. Same checks as
tests/integration/test_inflight_rollout.py (the HF engine), with vLLM's log-prob
tolerance (its fp32 kernels differ from HF's in summation order)."""

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (RLPOST_VLLM=1 bash scripts/setup.sh)")

from rollout_contract import LOGPROB_MEAN_TOL, at, char_tokenizer, save_model, teacher_forced_logits  # noqa: E402
from test_inflight_rollout import K, generate_with_update, reference  # noqa: E402

from rlpost.engines.vllm_rollout import VLLMRolloutEngine  # noqa: E402
from rlpost.types import SamplingParams  # noqa: E402

pytestmark = pytest.mark.integration
L = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_model(tmp_path_factory.mktemp("qwen2"), char_tokenizer(), tie=False, hidden=64, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def weights(model_dir):
    from safetensors.torch import load_file

    v0 = load_file(f"{model_dir}/model.safetensors")
    return v0, {k: v * 1.5 for k, v in v0.items()}


@pytest.mark.parametrize("kv", ["keep", "recompute"])
def test_tokens_after_an_inflight_update_are_labelled_and_sampled_by_it(model_dir, weights, kv):
    v0, v1 = weights
    tok = char_tokenizer()
    prompts = [tok(text).input_ids for text in ("ab", "c 123 e", "4")]
    engine = VLLMRolloutEngine(model_dir, seed=0, max_model_len=128, kv_cache_gb=0.0625, inflight_kv=kv)
    out = generate_with_update(engine, prompts, SamplingParams(n=2, max_new_tokens=L),
                               lambda: engine.update_weights(v1.items(), 1))
    assert engine.policy_version == 1
    old, new = reference(model_dir, v0), reference(model_dir, v1)
    gaps_old, gaps_new, long_rows = [], [], 0
    for prompt, group in zip(prompts, out):
        for c in group:
            n = len(c.token_ids)
            assert c.versions() == tuple(min(i // K, 1) for i in range(n))  # K tokens of version 0, then 1
            assert c.policy_version == 0
            if n <= K:
                continue  # ended (EOS) before the update
            long_rows += 1
            lp = torch.tensor(c.logprobs)
            gaps_old.append((lp[:K] - at(torch.log_softmax(teacher_forced_logits(old, prompt, c), -1), c)[:K]).abs())
            gaps_new.append((lp[K:] - at(torch.log_softmax(teacher_forced_logits(new, prompt, c), -1), c)[K:]).abs())
    assert long_rows >= 2
    assert torch.cat(gaps_old).mean() < LOGPROB_MEAN_TOL
    if kv == "recompute":  # re-prefilled: the new policy's exact continuation
        assert torch.cat(gaps_new).mean() < LOGPROB_MEAN_TOL
    else:  # the new weights attend to keys/values the old ones computed
        assert torch.cat(gaps_new).mean() > 10 * LOGPROB_MEAN_TOL
    # After the generate the engine serves version 1 alone (keep reset the prefix cache).
    again = engine.generate(prompts, SamplingParams(n=1, max_new_tokens=4))
    assert all(c.token_versions is None and c.policy_version == 1 for g in again for c in g)


def test_async_inflight_updates_through_ray_into_vllm(tmp_path):
    """Three async steps with in-flight updates into the vLLM actor: its receive_weights
    runs in its own concurrency group while generate steps the engine."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    args = ["+recipe=grpo_math", "rollout=vllm", "rollout.kv_cache_gb=0.0625", "data.train_batch_size=4",
            "rollout.n=2", "eval.every=0", "reward.workers=1", "ray.num_cpus=4", "trainer.total_steps=3",
            "trainer.save_every=0", "trainer.mode=async", "trainer.inflight_updates=true", "trainer.max_staleness=2",
            "rollout.inflight_kv=recompute", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "rlpost.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        shares = r["async/token_lag_0"] + r["async/token_lag_1"] + r["async/token_lag_2plus"]
        assert abs(shares - 1.0) < 1e-9 and r["async/staleness_max"] <= 2
