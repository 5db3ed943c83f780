"""HFRolloutEngine on a tiny random Qwen2 with a character tokenizer built here.

Reference values come from a teacher-forced forward of the same model over
``prompt + completion`` without padding or cache, and the sampling distribution's
definition (temperature, top-k, top-p)."""

import pytest
import torch

from rlpost.engines.hf_rollout import HFRolloutEngine
from rlpost.errors import ModelError
from rlpost.types import SamplingParams

pytestmark = pytest.mark.integration

CHARS = list("abcde0123456789 ")
PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _save_model(path, tokenizer, tie: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=tie)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.set_num_threads(1)
    return _save_model(tmp_path_factory.mktemp("qwen2"), tokenizer, tie=False)


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture
def engine(model_dir):
    return HFRolloutEngine(model_dir, seed=0, batch_size=5)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    # Different lengths, so the batch is left-padded.
    return [tokenizer(text).input_ids for text in ("ab", "c 123 e", "4")]


def _teacher_forced_logits(model, prompt, completion) -> torch.Tensor:
    """[L, V] logits that predicted each completion token."""
    ids = torch.tensor([list(prompt) + list(completion.token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return logits[len(prompt) - 1:-1]


def _at(values: torch.Tensor, completion) -> torch.Tensor:
    return values.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)


def test_n_completions_per_prompt_in_order(engine, prompts, tokenizer):
    out = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=12))
    assert [len(group) for group in out] == [4, 4, 4]
    for group in out:
        for c in group:
            assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
            assert EOS not in c.token_ids[:-1]
            assert c.finish_reason == ("stop" if c.token_ids[-1] == EOS else "length")
            if c.finish_reason == "length":
                assert len(c.token_ids) == 12
            assert c.text == tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
            assert c.policy_version == 0
            assert all(lp <= 0 for lp in c.logprobs)


def test_length_and_eos_finish_reasons(engine, prompts):
    short = [c for g in engine.generate(prompts[:1], SamplingParams(n=16, max_new_tokens=2)) for c in g]
    assert any(c.finish_reason == "length" for c in short)
    assert all(len(c.token_ids) == 2 for c in short if c.finish_reason == "length")
    # With 19 near-uniform tokens, P(no EOS in 40 steps) is about (18/19)^40 = 0.11 per
    # sample, so some of 16 samples stop on EOS.
    long = [c for g in engine.generate(prompts[:1], SamplingParams(n=16, max_new_tokens=40)) for c in g]
    stopped = [c for c in long if c.finish_reason == "stop"]
    assert stopped and all(c.token_ids[-1] == EOS for c in stopped)
    assert all(c.text == c.text.replace("<eos>", "") for c in stopped)  # EOS skipped in text


def test_stop_string_truncates_at_the_completing_token(engine, prompts, tokenizer):
    # One row, so stopping early does not shift the random draws: the stopped
    # completion is a prefix of the free one.
    free = engine.generate(prompts[:1], SamplingParams(max_new_tokens=40, seed=7))[0][0]
    text = free.text
    assert len(text) >= 10
    cut = next(k for k in range(1, len(text)) if text[k - 1:k + 1] not in text[:k])  # first new 2-char string
    stop = text[cut - 1:cut + 1]
    # The first token whose decoded prefix contains the stop string.
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    length = next(k for k in range(1, len(free.token_ids) + 1) if stop in decode(free.token_ids[:k]))
    stopped = engine.generate(prompts[:1], SamplingParams(max_new_tokens=40, seed=7, stop=("zz", stop)))[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:length] and stopped.logprobs == free.logprobs[:length]
    assert stopped.text == text[:cut + 1] and stopped.text.endswith(stop)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forcing(engine, reference, prompts, temperature):
    out = engine.generate(prompts, SamplingParams(n=3, temperature=temperature, max_new_tokens=16))
    for prompt, group in zip(prompts, out):
        for c in group:
            expected = _at(torch.log_softmax(_teacher_forced_logits(reference, prompt, c) / temperature, -1), c)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_top_k_logprobs_are_renormalised_over_the_k_best(engine, reference, prompts):
    out = engine.generate(prompts, SamplingParams(n=2, top_k=3, max_new_tokens=16))
    for prompt, group in zip(prompts, out):
        for c in group:
            logits = _teacher_forced_logits(reference, prompt, c)
            top = logits.topk(3, dim=-1)
            assert all(t in row for t, row in zip(c.token_ids, top.indices.tolist()))
            expected = _at(logits, c) - torch.logsumexp(top.values, dim=-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_top_p_logprobs_are_renormalised_over_the_nucleus(engine, reference, prompts):
    top_p = 0.3
    out = engine.generate(prompts, SamplingParams(n=2, top_p=top_p, max_new_tokens=16))
    for prompt, group in zip(prompts, out):
        for c in group:
            for step, (token, lp) in enumerate(zip(c.token_ids, c.logprobs)):
                probs = torch.softmax(_teacher_forced_logits(reference, prompt, c)[step], -1).tolist()
                # The nucleus: most likely tokens until their mass reaches top_p.
                nucleus, mass = [], 0.0
                for t in sorted(range(len(probs)), key=lambda t: -probs[t]):
                    nucleus.append(t)
                    mass += probs[t]
                    if mass >= top_p:
                        break
                assert token in nucleus
                assert lp == pytest.approx(torch.log(torch.tensor(probs[token] / mass)).item(), abs=1e-4)


def test_greedy_is_deterministic_argmax(engine, reference, prompts):
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    first, second = engine.generate(prompts, params), engine.generate(prompts, params)
    assert first == second
    for prompt, group in zip(prompts, first):
        assert group[0] == group[1]
        c = group[0]
        logits = _teacher_forced_logits(reference, prompt, c)
        assert list(c.token_ids) == logits.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(c.logprobs), _at(torch.log_softmax(logits, -1), c), atol=1e-4, rtol=0)


def test_seeds_make_sampling_reproducible(model_dir, prompts):
    params = SamplingParams(n=3, max_new_tokens=12)
    a, b = HFRolloutEngine(model_dir, seed=1), HFRolloutEngine(model_dir, seed=1)
    calls_a = [a.generate(prompts, params) for _ in range(2)]
    assert calls_a == [b.generate(prompts, params) for _ in range(2)]
    assert calls_a[0] != calls_a[1]  # the engine's generator advances between calls
    assert HFRolloutEngine(model_dir, seed=2).generate(prompts, params) != calls_a[0]
    pinned = SamplingParams(n=3, max_new_tokens=12, seed=5)
    assert a.generate(prompts, pinned) == b.generate(prompts, pinned) == a.generate(prompts, pinned)


def test_update_weights_changes_outputs_and_restores_bit_for_bit(engine, prompts):
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    original = {k: v.clone() for k, v in engine.model.state_dict().items()}
    before = engine.generate(prompts, greedy)

    gen = torch.Generator().manual_seed(0)
    engine.update_weights(((k, v + 0.5 * torch.randn(v.shape, generator=gen)) for k, v in original.items()), 1)
    changed = engine.generate(prompts, greedy)
    assert engine.policy_version == 1 and all(g[0].policy_version == 1 for g in changed)
    assert [g[0].token_ids for g in changed] != [g[0].token_ids for g in before]

    engine.update_weights(iter(original.items()), 2)
    restored = engine.generate(prompts, greedy)
    assert [g[0].token_ids for g in restored] == [g[0].token_ids for g in before]
    assert [g[0].logprobs for g in restored] == [g[0].logprobs for g in before]  # bit-for-bit
    assert restored[0][0].policy_version == 2


def test_update_weights_rejects_bad_names_shapes_and_gaps(engine, prompts):
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    sent = []

    def stream(items):
        for item in items:
            sent.append(item[0])
            yield item

    bad_name = [("model.layers.0.mlp.gate.weight", torch.zeros(1))] + list(state.items())
    with pytest.raises(ModelError, match="unknown weight name 'model.layers.0.mlp.gate.weight'"):
        engine.update_weights(stream(bad_name), 1)
    assert len(sent) == len(bad_name)  # drained, so a streaming sender is not left waiting
    assert engine.policy_version == 0
    with pytest.raises(ModelError, match="mix of versions"):
        engine.generate(prompts, SamplingParams(max_new_tokens=2))

    name = "model.embed_tokens.weight"
    with pytest.raises(ModelError, match="shape"):
        engine.update_weights([(name, state[name][:-1])], 1)
    with pytest.raises(ModelError, match="not sent"):
        engine.update_weights([(name, state[name])], 1)

    engine.update_weights(state.items(), 3)  # a full, valid update makes it usable again
    assert engine.generate(prompts, SamplingParams(max_new_tokens=2))[0][0].policy_version == 3


def test_tied_embeddings_accept_either_name(tmp_path, tokenizer, prompts):
    engine = HFRolloutEngine(_save_model(tmp_path, tokenizer, tie=True))
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.update_weights(((k, v) for k, v in state.items() if k != "lm_head.weight"), 1)
    engine.update_weights(state.items(), 2)
    scaled = {**state, "model.embed_tokens.weight": state["model.embed_tokens.weight"] * 3}
    engine.update_weights(((k, v) for k, v in scaled.items() if k != "lm_head.weight"), 3)
    assert torch.equal(engine.model.lm_head.weight, scaled["model.embed_tokens.weight"])
    halved = {**state, "lm_head.weight": state["lm_head.weight"] / 2}
    engine.update_weights(((k, v) for k, v in halved.items() if k != "model.embed_tokens.weight"), 4)
    assert torch.equal(engine.model.model.embed_tokens.weight, halved["lm_head.weight"])
