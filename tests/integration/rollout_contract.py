"""The contract every rollout engine keeps, as tests that run against each engine.

A test module subclasses ``RolloutEngineContract`` (pytest collects it as a ``Test*``
class) and provides the ``engine`` fixture; everything else comes from here: a tiny
random Qwen2 with a one-token-per-character tokenizer, and the reference the engine's
samples are checked against: a teacher-forced fp32 forward of the HF model over
``prompt + completion`` (no padding, no cache) and the sampling distribution's
definition (temperature, top-k, top-p).

``exact_logprobs``: the engine computes log-probs with the reference's own kernels, so
they agree per token to 1e-4 and a stop-truncated sample's log-probs are a prefix of
the free one's; otherwise (vLLM) the mean gap must stay under ``LOGPROB_MEAN_TOL``.
"""

from __future__ import annotations

import pytest
import torch

from rlpost.errors import ModelError
from rlpost.types import SamplingParams

CHARS = list("abcde0123456789 ")
PAD, EOS = 0, 1
LOGPROB_MEAN_TOL = 1e-3  # mean |engine - reference| log-prob when kernels differ (summation order)


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def save_model(path, tokenizer, tie: bool, hidden: int = 32, heads: int = 4, kv_heads: int = 2) -> str:
    """A random 2-layer Qwen2 (seeded) and the tokenizer, saved into ``path``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=tie)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def teacher_forced_logits(model, prompt, completion) -> torch.Tensor:
    """[L, V] logits that predicted each completion token."""
    ids = torch.tensor([list(prompt) + list(completion.token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return logits[len(prompt) - 1:-1]


def at(values: torch.Tensor, completion) -> torch.Tensor:
    return values.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)


def tokens(out) -> list[list[tuple[int, ...]]]:
    return [[c.token_ids for c in group] for group in out]


class RolloutEngineContract:
    exact_logprobs = True
    model_shape: dict = {}  # save_model's hidden / heads / kv_heads for this engine

    # ------------------------------------------------------------ fixtures
    @pytest.fixture(scope="class")
    @classmethod
    def tokenizer(cls):
        return char_tokenizer()

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory, tokenizer):
        torch.set_num_threads(1)
        return save_model(tmp_path_factory.mktemp("qwen2"), tokenizer, tie=False, **cls.model_shape)

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, model_dir):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @pytest.fixture(scope="class")
    @classmethod
    def prompts(cls, tokenizer):
        # Different lengths, so a batch is padded.
        return [tokenizer(text).input_ids for text in ("ab", "c 123 e", "4")]

    @pytest.fixture
    def original(self, model_dir):
        from safetensors.torch import load_file

        return load_file(f"{model_dir}/model.safetensors")

    @pytest.fixture
    def restore(self, engine, original):
        """Puts the original weights back after a test that changes them (an engine
        fixture may serve a whole class)."""
        yield
        engine.update_weights(original.items(), 0)

    # ------------------------------------------------------------- helpers
    def assert_logprobs_close(self, completions, expected) -> None:
        got = [torch.tensor(c.logprobs) for c in completions]
        if self.exact_logprobs:
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e.float(), atol=1e-4, rtol=0)
            return
        diff = torch.cat([(g - e).abs() for g, e in zip(got, expected)])
        assert diff.mean().item() < LOGPROB_MEAN_TOL, diff

    def assert_serves(self, engine, prompts, model_dir, state) -> None:
        """Sampled log-probs equal those of an HF model holding ``state`` (temperature 1)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.load_state_dict(state, strict=False)  # a tied checkpoint has no lm_head.weight
        out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=12))
        self.assert_logprobs_close(
            [c for group in out for c in group],
            [at(torch.log_softmax(teacher_forced_logits(model, p, c), -1), c) for p, group in zip(prompts, out)
             for c in group])

    # --------------------------------------------------------------- tests
    def test_n_completions_per_prompt_in_order(self, engine, prompts, tokenizer):
        out = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=12))
        assert [len(group) for group in out] == [4, 4, 4]
        for group in out:
            assert len({c.token_ids for c in group}) > 1  # the n samples are not copies
            for c in group:
                assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
                assert EOS not in c.token_ids[:-1]
                assert c.finish_reason == ("stop" if c.token_ids[-1] == EOS else "length")
                if c.finish_reason == "length":
                    assert len(c.token_ids) == 12
                assert c.text == tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
                assert c.policy_version == 0
                assert all(lp <= 0 for lp in c.logprobs)

    def test_length_and_eos_finish_reasons(self, engine, prompts):
        short = [c for g in engine.generate(prompts[:1], SamplingParams(n=16, max_new_tokens=2)) for c in g]
        assert any(c.finish_reason == "length" for c in short)
        assert all(len(c.token_ids) == 2 for c in short if c.finish_reason == "length")
        # With 19 near-uniform tokens, P(no EOS in 40 steps) is about (18/19)^40 = 0.11 per
        # sample, so some of 16 samples stop on EOS, and the EOS is kept in token_ids.
        long = [c for g in engine.generate(prompts[:1], SamplingParams(n=16, max_new_tokens=40)) for c in g]
        stopped = [c for c in long if c.finish_reason == "stop"]
        assert stopped and all(c.token_ids[-1] == EOS for c in stopped)
        assert all("<eos>" not in c.text for c in stopped)  # EOS skipped in text

    def test_stop_string_truncates_at_the_completing_token(self, engine, prompts, tokenizer):
        # One row and a pinned seed: stopping early does not shift the random draws, so
        # the stopped completion is a prefix of the free one.
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
        assert stopped.token_ids == free.token_ids[:length]
        assert stopped.text == text[:cut + 1] and stopped.text.endswith(stop)
        if self.exact_logprobs:
            assert stopped.logprobs == free.logprobs[:length]

    @pytest.mark.parametrize("temperature", [1.0, 0.7])
    def test_logprobs_match_teacher_forcing(self, engine, reference, prompts, temperature):
        out = engine.generate(prompts, SamplingParams(n=3, temperature=temperature, max_new_tokens=16))
        completions = [c for group in out for c in group]
        expected = [at(torch.log_softmax(teacher_forced_logits(reference, p, c) / temperature, -1), c)
                    for p, group in zip(prompts, out) for c in group]
        self.assert_logprobs_close(completions, expected)

    def test_top_k_logprobs_are_renormalised_over_the_k_best(self, engine, reference, prompts):
        out = engine.generate(prompts, SamplingParams(n=2, top_k=3, max_new_tokens=16))
        completions, expected = [], []
        for prompt, group in zip(prompts, out):
            for c in group:
                logits = teacher_forced_logits(reference, prompt, c)
                top = logits.topk(3, dim=-1)
                assert all(t in row for t, row in zip(c.token_ids, top.indices.tolist()))
                completions.append(c)
                expected.append(at(logits, c) - torch.logsumexp(top.values, dim=-1))
        self.assert_logprobs_close(completions, expected)

    def test_top_p_logprobs_are_renormalised_over_the_nucleus(self, engine, reference, prompts):
        top_p = 0.3
        out = engine.generate(prompts, SamplingParams(n=2, top_p=top_p, max_new_tokens=16))
        completions, expected = [], []
        for prompt, group in zip(prompts, out):
            for c in group:
                probs = torch.softmax(teacher_forced_logits(reference, prompt, c), -1)
                want = []
                for step, token in enumerate(c.token_ids):
                    # The nucleus: most likely tokens until their mass reaches top_p.
                    nucleus, mass = [], 0.0
                    for t in sorted(range(probs.shape[-1]), key=lambda t: -probs[step, t].item()):
                        nucleus.append(t)
                        mass += probs[step, t].item()
                        if mass >= top_p:
                            break
                    assert token in nucleus
                    want.append(torch.log(probs[step, token] / mass).item())
                completions.append(c)
                expected.append(torch.tensor(want))
        self.assert_logprobs_close(completions, expected)

    def test_greedy_is_deterministic_argmax(self, engine, reference, prompts):
        params = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
        first, second = engine.generate(prompts, params), engine.generate(prompts, params)
        assert tokens(first) == tokens(second)
        if self.exact_logprobs:
            assert first == second
        for prompt, group in zip(prompts, first):
            assert group[0].token_ids == group[1].token_ids
            c = group[0]
            logits = teacher_forced_logits(reference, prompt, c)
            assert list(c.token_ids) == logits.argmax(-1).tolist()
            self.assert_logprobs_close([c], [at(torch.log_softmax(logits, -1), c)])  # plain softmax

    def test_update_weights_changes_outputs_and_restores_bit_for_bit(self, engine, prompts, original, restore,
                                                                     model_dir):
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
        before = engine.generate(prompts, greedy)

        gen = torch.Generator().manual_seed(0)
        perturbed = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
        engine.update_weights((item for item in perturbed.items()), 1)
        self.assert_serves(engine, prompts, model_dir, perturbed)  # the new weights, every layer of them
        changed = engine.generate(prompts, greedy)
        assert engine.policy_version == 1 and all(g[0].policy_version == 1 for g in changed)
        assert tokens(changed) != tokens(before)

        engine.update_weights(iter(original.items()), 2)  # a one-pass iterator, as weight_sync yields
        restored = engine.generate(prompts, greedy)
        assert tokens(restored) == tokens(before)
        assert [g[0].logprobs for g in restored] == [g[0].logprobs for g in before]  # bit-for-bit
        assert restored[0][0].policy_version == 2

    def test_update_weights_rejects_bad_names_shapes_and_gaps(self, engine, prompts, original, restore):
        sent = []

        def stream(items):
            for item in items:
                sent.append(item[0])
                yield item

        bad_name = [("model.layers.0.mlp.gate.weight", torch.zeros(1))] + list(original.items())
        with pytest.raises(ModelError, match="unknown weight name 'model.layers.0.mlp.gate.weight'"):
            engine.update_weights(stream(bad_name), 1)
        assert len(sent) == len(bad_name)  # drained, so a streaming sender is not left waiting
        assert engine.policy_version == 0
        with pytest.raises(ModelError, match="mix of versions"):
            engine.generate(prompts, SamplingParams(max_new_tokens=2))

        name = "model.embed_tokens.weight"
        with pytest.raises(ModelError, match="shape"):
            engine.update_weights([(name, original[name][:-1])], 1)
        with pytest.raises(ModelError, match="not sent"):
            engine.update_weights([(name, original[name])], 1)

        engine.update_weights(original.items(), 3)  # a full, valid update makes it usable again
        assert engine.generate(prompts, SamplingParams(max_new_tokens=2))[0][0].policy_version == 3
