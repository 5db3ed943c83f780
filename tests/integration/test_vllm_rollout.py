"""VLLMRolloutEngine: the rollout-engine contract (tests/integration/rollout_contract.py)
on a tiny random Qwen2, plus what is particular to it (its generator, vLLM's scheduler
limits, tied embeddings repacked by the CPU backend), and two GRPO steps through Ray.

The model has head size 32, the smallest vLLM's CPU attention runs. One engine serves
the class (vLLM starts in a few seconds; weights are restored after each test that
changes them). vLLM's fp32 kernels differ from HF's in summation order only, so
log-probs are compared by their mean gap.
"""

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (RLPOST_VLLM=1 bash scripts/setup.sh)")

from rollout_contract import LOGPROB_MEAN_TOL, RolloutEngineContract, save_model, tokens  # noqa: E402

from rlpost.engines.vllm_rollout import VLLMRolloutEngine  # noqa: E402
from rlpost.types import SamplingParams  # noqa: E402

pytestmark = pytest.mark.integration


class TestVLLMRolloutEngine(RolloutEngineContract):
    exact_logprobs = False
    model_shape = {"hidden": 64, "heads": 2, "kv_heads": 1}

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, model_dir):
        return VLLMRolloutEngine(model_dir, seed=0, max_model_len=128, kv_cache_gb=0.0625)

    def test_seeds_make_sampling_reproducible(self, engine, prompts):
        params = SamplingParams(n=3, max_new_tokens=12)
        engine.generator.manual_seed(1)
        calls = [tokens(engine.generate(prompts, params)) for _ in range(2)]
        assert calls[0] != calls[1]  # the engine's generator advances between calls
        engine.generator.manual_seed(1)
        assert [tokens(engine.generate(prompts, params)) for _ in range(2)] == calls
        engine.generator.manual_seed(2)
        assert tokens(engine.generate(prompts, params)) != calls[0]
        pinned = SamplingParams(n=3, max_new_tokens=12, seed=5)
        first = engine.generate(prompts, pinned)
        assert tokens(first) == tokens(engine.generate(prompts, pinned))
        # A pinned call neither reads nor advances the engine's generator.
        engine.generator.manual_seed(1)
        engine.generate(prompts, pinned)
        assert tokens(engine.generate(prompts, params)) == calls[0]

    def test_more_prompt_tokens_than_one_step_schedules(self, engine, tokenizer):
        # 80 x 100 prompt tokens exceed vLLM's per-step token budget (4096 on CPU), which
        # with chunked prefill would split a seeded prompt and crash vLLM 0.32 on CPU.
        prompts = [tokenizer(("ab 12 " * 20)[:99] + str(i % 10)).input_ids for i in range(80)]
        out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=4, seed=3))
        assert [len(group) for group in out] == [2] * 80

    def test_bad_prompts_and_params_are_rejected(self, engine):
        with pytest.raises(ValueError, match="empty"):
            engine.generate([[]], SamplingParams())
        with pytest.raises(ValueError, match="outside"):
            engine.generate([[10_000]], SamplingParams())
        with pytest.raises(ValueError, match="top_p"):
            engine.generate([[3]], SamplingParams(top_p=0.0))

    def test_generate_computes_with_the_engines_thread_count(self, engine, model_dir, prompts):
        with pytest.raises(ValueError, match="num_threads"):
            VLLMRolloutEngine(model_dir, num_threads=0)
        before = torch.get_num_threads()
        try:
            engine.num_threads = 1  # what the constructor's num_threads=1 stores
            torch.set_num_threads(2)  # e.g. a trainer in the same process between two calls
            engine.generate(prompts, SamplingParams(max_new_tokens=2))
            assert torch.get_num_threads() == 1
        finally:
            engine.num_threads = None
            torch.set_num_threads(before)

    def test_multi_turn_runs_size_the_engine_for_the_whole_episode(self, model_dir):
        """max_model_len from RunConfig.context_tokens: an agent run with 24 prompt tokens,
        16 per turn and max_total_tokens=150 holds a 150-token conversation (24 + 150 = 174),
        which the old prompt + one turn sizing (24 + 16 = 40) refused."""
        from rlpost.config.load import load_config
        from rlpost.engines import make_rollout_engine

        cfg = load_config(["rollout.engine=vllm", "rollout.kv_cache_gb=0.0625", "data.max_prompt_tokens=24",
                           "rollout.max_new_tokens=16", "env.agent=my_agent:run", "rollout.max_total_tokens=150"])
        engine = make_rollout_engine(cfg, model_dir, seed=0)
        conversation = [3 + i % 16 for i in range(150)]  # the contract tokenizer: ids 3..18 are characters
        ((reply,),) = engine.generate([conversation], SamplingParams(temperature=0.0, max_new_tokens=16))
        assert len(reply.token_ids) >= 1 and len(reply.logprobs) == len(reply.token_ids)

    def test_tied_embeddings_accept_either_name(self, tmp_path, tokenizer, prompts):
        from safetensors.torch import load_file

        path = save_model(tmp_path, tokenizer, tie=True, **self.model_shape)
        engine = VLLMRolloutEngine(path, max_model_len=128, kv_cache_gb=0.0625)
        state = load_file(f"{path}/model.safetensors")
        assert "lm_head.weight" not in state  # save_pretrained stores the tied pair once
        embed = state["model.embed_tokens.weight"]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
        before = engine.generate(prompts, greedy)

        # The update must reach both uses of the tied matrix (the input embedding and the
        # output projection, which vLLM's CPU backend repacks separately).
        gen = torch.Generator().manual_seed(0)
        perturbed = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        engine.update_weights(perturbed.items(), 1)
        self.assert_serves(engine, prompts, path, perturbed)
        changed = engine.generate(prompts, greedy)
        assert [g[0].logprobs for g in changed] != [g[0].logprobs for g in before]
        # The same tensor under the lm_head name gives the same model.
        rest = {k: v for k, v in perturbed.items() if k != "model.embed_tokens.weight"}
        engine.update_weights({**rest, "lm_head.weight": perturbed["model.embed_tokens.weight"]}.items(), 2)
        assert [g[0].logprobs for g in engine.generate(prompts, greedy)] == [g[0].logprobs for g in changed]
        rest = {k: v for k, v in state.items() if k != "model.embed_tokens.weight"}
        engine.update_weights({**rest, "lm_head.weight": embed}.items(), 3)
        assert [g[0].logprobs for g in engine.generate(prompts, greedy)] == [g[0].logprobs for g in before]

    def test_reloads_do_not_warn_about_layers_without_weights_of_their_own(self, tmp_path, tokenizer):
        """vLLM 0.32 warns "<Layer>: Failed to load weights" on every in-place update for
        the rotary embedding and the tied head, which take no weights; rlpost drops only
        those (a layer that does have weights and got none still warns)."""
        import logging

        from safetensors.torch import load_file

        from rlpost.engines.vllm_rollout import _RELOAD_LOGGER, _WeightlessReloadFilter

        path = save_model(tmp_path, tokenizer, tie=True, **self.model_shape)
        engine = VLLMRolloutEngine(path, max_model_len=128, kv_cache_gb=0.0625)
        seen: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record):
                seen.append(record.getMessage())

        logger = logging.getLogger(_RELOAD_LOGGER)
        handler = Collect(level=logging.WARNING)
        logger.addHandler(handler)
        try:
            state = load_file(f"{path}/model.safetensors")
            engine.update_weights(state.items(), 1)
            assert not [m for m in seen if "Failed to load weights" in m], seen
            # Without rlpost's filter vLLM says it for exactly those layers.
            ours = [f for f in logger.filters if isinstance(f, _WeightlessReloadFilter)]
            for f in ours:
                logger.removeFilter(f)
            engine.update_weights(state.items(), 2)
            noise = {m.split(":")[0] for m in seen if m.endswith("Failed to load weights")}
            assert noise and all("RotaryEmbedding" in m or m == "ParallelLMHead" for m in noise), seen
        finally:
            logger.removeHandler(handler)
            for f in ours:
                logger.addFilter(f)
        # The same message about a layer with weights of its own is kept.
        record = logging.LogRecord(_RELOAD_LOGGER, logging.WARNING, __file__, 0, "%s: Failed to load weights",
                                   ("Qwen2MLP",), None)
        assert ours[0].filter(record)


def test_training_through_ray_syncs_weights_into_vllm(tmp_path):
    """Two GRPO steps of the tiny recipe with rollout=vllm: weights stream from the FSDP2
    trainer over the weight-sync group into the vLLM actor, and the trainer's log-probs
    of the sampled tokens match the sampler's at every policy version."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    args = ["+recipe=grpo_math", "rollout=vllm", "rollout.kv_cache_gb=0.0625", "data.train_batch_size=4",
            "rollout.n=2", "eval.size=8", "eval.every=0", "reward.workers=1", "ray.num_cpus=4",
            "trainer.total_steps=2", "trainer.save_every=0", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "rlpost.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("step", 0) >= 1]
    assert [r["rollout/policy_version"] for r in steps] == [0, 1]
    assert all(r["rollout/logprob_abs_diff_mean"] < LOGPROB_MEAN_TOL for r in steps), steps


def test_the_prototype_samples_with_a_named_engine():
    """rlpost.prototype with engine="vllm" / "hf" uses that engine (in-process vLLM, so
    here, after the rest of this file's vLLM engines)."""
    from rlpost import prototype
    from rlpost.engines.hf_rollout import HFRolloutEngine

    questions = [{"prompt": "What is 2 + 3?", "answer": "5"}]
    hf = prototype.sample_completions("builtin:tiny-math", questions, n=2, max_new_tokens=8, engine="hf")
    vllm = prototype.sample_completions("builtin:tiny-math", questions, n=2, max_new_tokens=8, engine="vllm")
    assert isinstance(prototype._engine("builtin:tiny-math", "float32", 0, "hf"), HFRolloutEngine)
    assert isinstance(prototype._engine("builtin:tiny-math", "float32", 0, "vllm"), VLLMRolloutEngine)
    assert len(hf) == len(vllm) == 2
