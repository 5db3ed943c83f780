"""In-flight weight updates in the HF rollout engine (``rlpost.engines.inflight``): an
update from another thread lands between two decoding steps of a running ``generate``;
every token records the version that sampled it, and ``rollout.inflight_kv`` decides
whether the KV cache built so far is kept or recomputed with the new weights.

The switch point is made exact with ``DecodeGate.pause_after``: steps past the k-th
wait until the update has loaded, so the first ``K`` tokens of every row are version
0's and the rest version 1's; the log-probs are then checked against teacher-forced
forwards of each version (tests/integration/rollout_contract.py)."""

import threading

import pytest
import torch
from rollout_contract import at, char_tokenizer, save_model, teacher_forced_logits

from rlpost.engines.hf_rollout import HFRolloutEngine
from rlpost.errors import ModelError
from rlpost.types import SamplingParams

pytestmark = pytest.mark.integration
K, L = 4, 9  # tokens sampled before the update, tokens per row


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_model(tmp_path_factory.mktemp("qwen2"), char_tokenizer(), tie=False)


@pytest.fixture(scope="module")
def weights(model_dir):
    """Version 0 (the checkpoint) and version 1 (every tensor scaled: another policy)."""
    from safetensors.torch import load_file

    v0 = load_file(f"{model_dir}/model.safetensors")
    return v0, {k: v * 1.5 for k, v in v0.items()}


@pytest.fixture(scope="module")
def prompts():
    tok = char_tokenizer()
    return [tok(text).input_ids for text in ("ab", "c 123 e")]  # different lengths: left padding


def reference(model_dir, state):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict(state)
    return model


def generate_with_update(engine, prompts, params, update):
    """``engine.generate`` in a thread; ``update()`` runs after its K-th decoding step."""
    out, errors = [], []

    def run():
        try:
            out.append(engine.generate(prompts, params))
        except Exception as exc:  # re-raised on the test thread
            errors.append(exc)

    engine.gate.pause_after(engine.gate.steps + K)
    thread = threading.Thread(target=run)
    thread.start()
    assert engine.gate.wait_steps(K, timeout=60)
    try:
        update()
    finally:
        thread.join(60)
    if errors:
        raise errors[0]
    return out[0]


@pytest.mark.parametrize("kv", ["keep", "recompute"])
def test_tokens_after_an_inflight_update_are_labelled_and_sampled_by_it(model_dir, weights, prompts, kv):
    v0, v1 = weights
    engine = HFRolloutEngine(model_dir, seed=0, inflight_kv=kv)
    engine.eos_ids = frozenset()  # the random model samples EOS anywhere; every row runs L tokens
    out = generate_with_update(engine, prompts, SamplingParams(n=2, max_new_tokens=L),
                               lambda: engine.update_weights(v1.items(), 1))
    assert engine.policy_version == 1
    old, new = reference(model_dir, v0), reference(model_dir, v1)
    for prompt, group in zip(prompts, out):
        for c in group:
            assert len(c.token_ids) == L
            assert c.token_versions == (0,) * K + (1,) * (L - K)
            assert c.policy_version == 0  # the oldest token's
            lp = torch.tensor(c.logprobs)
            expect_old = at(torch.log_softmax(teacher_forced_logits(old, prompt, c), -1), c)
            expect_new = at(torch.log_softmax(teacher_forced_logits(new, prompt, c), -1), c)
            torch.testing.assert_close(lp[:K], expect_old[:K], atol=1e-4, rtol=0)
            if kv == "recompute":  # the new policy's exact continuation of the context
                torch.testing.assert_close(lp[K:], expect_new[K:], atol=1e-4, rtol=0)
            else:  # the new weights attend to keys/values the old ones computed
                assert (lp[K:] - expect_new[K:]).abs().max() > 1e-3


def test_an_update_that_fails_midway_stops_the_generate_in_flight(model_dir, weights, prompts):
    v0, _ = weights
    engine = HFRolloutEngine(model_dir, seed=0)
    engine.eos_ids = frozenset()

    def bad_update():
        with pytest.raises(ModelError, match="not sent"):
            engine.update_weights(list(v0.items())[:1], 1)

    with pytest.raises(ModelError, match="failed part-way"):
        generate_with_update(engine, prompts, SamplingParams(n=1, max_new_tokens=L), bad_update)


def test_without_an_update_every_token_has_the_served_version(model_dir, prompts):
    engine = HFRolloutEngine(model_dir, seed=0)
    out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=L))
    assert all(c.token_versions is None and c.policy_version == 0 for g in out for c in g)
    assert engine.gate.steps >= 1
