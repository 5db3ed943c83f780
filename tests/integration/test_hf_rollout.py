"""HFRolloutEngine: the rollout-engine contract (tests/integration/rollout_contract.py)
on a tiny random Qwen2, plus what is particular to it (seeding by engine instance, how
it keeps tied embeddings tied)."""

import pytest
import torch
from rollout_contract import RolloutEngineContract, save_model

from rlpost.engines.hf_rollout import HFRolloutEngine
from rlpost.types import SamplingParams

pytestmark = pytest.mark.integration


class TestHFRolloutEngine(RolloutEngineContract):
    exact_logprobs = True  # the reference's own forward

    @pytest.fixture
    def engine(self, model_dir):
        return HFRolloutEngine(model_dir, seed=0, batch_size=5)

    def test_seeds_make_sampling_reproducible(self, model_dir, prompts):
        params = SamplingParams(n=3, max_new_tokens=12)
        a, b = HFRolloutEngine(model_dir, seed=1), HFRolloutEngine(model_dir, seed=1)
        calls_a = [a.generate(prompts, params) for _ in range(2)]
        assert calls_a == [b.generate(prompts, params) for _ in range(2)]
        assert calls_a[0] != calls_a[1]  # the engine's generator advances between calls
        assert HFRolloutEngine(model_dir, seed=2).generate(prompts, params) != calls_a[0]
        pinned = SamplingParams(n=3, max_new_tokens=12, seed=5)
        assert a.generate(prompts, pinned) == b.generate(prompts, pinned) == a.generate(prompts, pinned)

    def test_tied_embeddings_accept_either_name(self, tmp_path, tokenizer):
        engine = HFRolloutEngine(save_model(tmp_path, tokenizer, tie=True))
        state = {k: v.clone() for k, v in engine.model.state_dict().items()}
        engine.update_weights(((k, v) for k, v in state.items() if k != "lm_head.weight"), 1)
        engine.update_weights(state.items(), 2)
        scaled = {**state, "model.embed_tokens.weight": state["model.embed_tokens.weight"] * 3}
        engine.update_weights(((k, v) for k, v in scaled.items() if k != "lm_head.weight"), 3)
        assert torch.equal(engine.model.lm_head.weight, scaled["model.embed_tokens.weight"])
        halved = {**state, "lm_head.weight": state["lm_head.weight"] / 2}
        engine.update_weights(((k, v) for k, v in halved.items() if k != "model.embed_tokens.weight"), 4)
        assert torch.equal(engine.model.model.embed_tokens.weight, halved["lm_head.weight"])

    def test_grouped_kv_heads_reach_sdpa_without_copies(self, model_dir):
        # The contract's log-prob tests above compare this engine with plain sdpa attention.
        engine = HFRolloutEngine(model_dir)
        assert engine.model.config.num_key_value_heads < engine.model.config.num_attention_heads
        assert engine.model.config._attn_implementation == "rlpost_grouped_sdpa"

    def test_generate_computes_with_the_engines_thread_count(self, model_dir, prompts):
        with pytest.raises(ValueError, match="num_threads"):
            HFRolloutEngine(model_dir, num_threads=0)
        before = torch.get_num_threads()
        try:
            engine = HFRolloutEngine(model_dir, num_threads=1)
            torch.set_num_threads(2)  # e.g. a trainer in the same process between two calls
            engine.generate(prompts, SamplingParams(max_new_tokens=2))
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(before)
