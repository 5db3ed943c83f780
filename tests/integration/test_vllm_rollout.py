"""VLLMRolloutEngine on a tiny random Qwen2 with a character tokenizer built here.

Same reference as tests/integration/test_hf_rollout.py: a teacher-forced fp32
forward of the HF model over ``prompt + completion`` and the sampling
distribution's definition (temperature, top-k, top-p). The model has head size 32,
the smallest vLLM's CPU attention runs. One engine serves the module (vLLM starts
in a few seconds; weights are restored after each test that changes them).
"""

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (RLPOST_VLLM=1 bash scripts/setup.sh)")

from rlpost.engines.vllm_rollout import VLLMRolloutEngine  # noqa: E402
from rlpost.errors import ModelError  # noqa: E402
from rlpost.types import SamplingParams  # noqa: E402

pytestmark = pytest.mark.integration

CHARS = list("abcde0123456789 ")
PAD, EOS = 0, 1
TOL = 1e-3  # mean |vLLM - HF| log-prob; fp32 kernels differ only in summation order


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _save_model(path, tokenizer, tie: bool) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
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


@pytest.fixture(scope="module")
def engine(model_dir):
    return VLLMRolloutEngine(model_dir, seed=0, max_model_len=128, kv_cache_gb=0.0625)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(text).input_ids for text in ("ab", "c 123 e", "4")]


def _teacher_forced_logits(model, prompt, completion) -> torch.Tensor:
    """[L, V] logits that predicted each completion token."""
    ids = torch.tensor([list(prompt) + list(completion.token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return logits[len(prompt) - 1:-1]


def _at(values: torch.Tensor, completion) -> torch.Tensor:
    return values.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)


def _assert_logprobs_close(completions, expected):
    diff = torch.cat([(torch.tensor(c.logprobs) - e).abs() for c, e in zip(completions, expected)])
    assert diff.mean().item() < TOL, diff


def _assert_serves(engine, prompts, model_dir, state):
    """Sampled log-probs equal those of an HF model holding ``state`` (temperature 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=False)  # a tied checkpoint has no lm_head.weight
    out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=12))
    completions = [c for group in out for c in group]
    expected = [_at(torch.log_softmax(_teacher_forced_logits(model, p, c), -1), c)
                for p, group in zip(prompts, out) for c in group]
    _assert_logprobs_close(completions, expected)


def test_n_completions_per_prompt_in_order(engine, prompts, tokenizer):
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


def test_length_and_eos_finish_reasons(engine, prompts):
    short = [c for g in engine.generate(prompts[:1], SamplingParams(n=16, max_new_tokens=2)) for c in g]
    assert any(c.finish_reason == "length" for c in short)
    assert all(len(c.token_ids) == 2 for c in short if c.finish_reason == "length")
    # With 19 near-uniform tokens, P(no EOS in 40 steps) is about (18/19)^40 = 0.11 per
    # sample, so some of 16 samples stop on EOS, and the EOS is kept in token_ids.
    long = [c for g in engine.generate(prompts[:1], SamplingParams(n=16, max_new_tokens=40)) for c in g]
    stopped = [c for c in long if c.finish_reason == "stop"]
    assert stopped and all(c.token_ids[-1] == EOS for c in stopped)
    assert all("<eos>" not in c.text for c in stopped)


def test_stop_string_truncates_at_the_completing_token(engine, prompts, tokenizer):
    # Same seed, so the stopped completion is a prefix of the free one.
    free = engine.generate(prompts[:1], SamplingParams(max_new_tokens=40, seed=7))[0][0]
    text = free.text
    assert len(text) >= 10
    cut = next(k for k in range(1, len(text)) if text[k - 1:k + 1] not in text[:k])  # first new 2-char string
    stop = text[cut - 1:cut + 1]
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    length = next(k for k in range(1, len(free.token_ids) + 1) if stop in decode(free.token_ids[:k]))
    stopped = engine.generate(prompts[:1], SamplingParams(max_new_tokens=40, seed=7, stop=("zz", stop)))[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:length]
    assert stopped.text == text[:cut + 1] and stopped.text.endswith(stop)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forcing(engine, reference, prompts, temperature):
    out = engine.generate(prompts, SamplingParams(n=3, temperature=temperature, max_new_tokens=16))
    completions, expected = [], []
    for prompt, group in zip(prompts, out):
        for c in group:
            completions.append(c)
            expected.append(_at(torch.log_softmax(_teacher_forced_logits(reference, prompt, c) / temperature, -1), c))
    _assert_logprobs_close(completions, expected)


def test_top_k_logprobs_are_renormalised_over_the_k_best(engine, reference, prompts):
    out = engine.generate(prompts, SamplingParams(n=2, top_k=3, max_new_tokens=16))
    completions, expected = [], []
    for prompt, group in zip(prompts, out):
        for c in group:
            logits = _teacher_forced_logits(reference, prompt, c)
            top = logits.topk(3, dim=-1)
            assert all(t in row for t, row in zip(c.token_ids, top.indices.tolist()))
            completions.append(c)
            expected.append(_at(logits, c) - torch.logsumexp(top.values, dim=-1))
    _assert_logprobs_close(completions, expected)


def test_top_p_logprobs_are_renormalised_over_the_nucleus(engine, reference, prompts):
    top_p = 0.3
    out = engine.generate(prompts, SamplingParams(n=2, top_p=top_p, max_new_tokens=16))
    completions, expected = [], []
    for prompt, group in zip(prompts, out):
        for c in group:
            probs = torch.softmax(_teacher_forced_logits(reference, prompt, c), -1)
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
    _assert_logprobs_close(completions, expected)


def test_greedy_is_deterministic_argmax(engine, reference, prompts):
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    first, second = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in second]
    for prompt, group in zip(prompts, first):
        assert group[0].token_ids == group[1].token_ids
        c = group[0]
        logits = _teacher_forced_logits(reference, prompt, c)
        assert list(c.token_ids) == logits.argmax(-1).tolist()
        _assert_logprobs_close([c], [_at(torch.log_softmax(logits, -1), c)])  # plain softmax


def test_seeds_make_sampling_reproducible(engine, prompts):
    params = SamplingParams(n=3, max_new_tokens=12)
    tokens = lambda out: [[c.token_ids for c in g] for g in out]  # noqa: E731
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


@pytest.fixture
def original(model_dir):
    from safetensors.torch import load_file

    return load_file(f"{model_dir}/model.safetensors")


@pytest.fixture
def restore(engine, original):
    yield
    engine.update_weights(original.items(), 0)


def test_update_weights_changes_outputs_and_restores_bit_for_bit(engine, prompts, original, restore, model_dir):
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    before = engine.generate(prompts, greedy)

    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    engine.update_weights((item for item in perturbed.items()), 1)
    _assert_serves(engine, prompts, model_dir, perturbed)  # the new weights, every layer of them
    changed = engine.generate(prompts, greedy)
    assert engine.policy_version == 1 and all(g[0].policy_version == 1 for g in changed)
    assert [g[0].token_ids for g in changed] != [g[0].token_ids for g in before]

    engine.update_weights(iter(original.items()), 2)  # a one-pass iterator, as weight_sync yields
    restored = engine.generate(prompts, greedy)
    assert [g[0].token_ids for g in restored] == [g[0].token_ids for g in before]
    assert [g[0].logprobs for g in restored] == [g[0].logprobs for g in before]  # bit-for-bit
    assert restored[0][0].policy_version == 2


def test_update_weights_rejects_bad_names_shapes_and_gaps(engine, prompts, original, restore):
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


def test_more_prompt_tokens_than_one_step_schedules(engine, tokenizer):
    # 80 x 100 prompt tokens exceed vLLM's per-step token budget (4096 on CPU), which
    # with chunked prefill would split a seeded prompt and crash vLLM 0.32 on CPU.
    prompts = [tokenizer(("ab 12 " * 20)[:99] + str(i % 10)).input_ids for i in range(80)]
    out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=4, seed=3))
    assert [len(group) for group in out] == [2] * 80


def test_bad_prompts_and_params_are_rejected(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[10_000]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[3]], SamplingParams(top_p=0.0))


def test_tied_embeddings_accept_either_name(tmp_path, tokenizer, prompts):
    from safetensors.torch import load_file

    path = _save_model(tmp_path, tokenizer, tie=True)
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
    _assert_serves(engine, prompts, path, perturbed)
    changed = engine.generate(prompts, greedy)
    assert [g[0].logprobs for g in changed] != [g[0].logprobs for g in before]
    # The same tensor under the lm_head name gives the same model.
    rest = {k: v for k, v in perturbed.items() if k != "model.embed_tokens.weight"}
    engine.update_weights({**rest, "lm_head.weight": perturbed["model.embed_tokens.weight"]}.items(), 2)
    assert [g[0].logprobs for g in engine.generate(prompts, greedy)] == [g[0].logprobs for g in changed]
    rest = {k: v for k, v in state.items() if k != "model.embed_tokens.weight"}
    engine.update_weights({**rest, "lm_head.weight": embed}.items(), 3)
    assert [g[0].logprobs for g in engine.generate(prompts, greedy)] == [g[0].logprobs for g in before]


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
    assert all(r["rollout/logprob_abs_diff_mean"] < TOL for r in steps), steps
