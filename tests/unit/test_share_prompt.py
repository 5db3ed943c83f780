"""Shared-prompt forward (rlpost.engines.prefix, trainer.share_prompt): the groups it
finds, and log-probs, entropy and gradients equal to the plain padded forward, on a
tiny random Qwen2 and the built-in tiny-math model, in this process."""

from __future__ import annotations

import pytest
import torch

from rlpost.engines import microbatch, prefix
from rlpost.engines.microbatch import ForwardOptions
from rlpost.types import ModelOutput, TrainBatch


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return ids, mask


def test_plan_groups_rows_by_common_prefix():
    # Sorted: r0 [1,2,3,4,5,6] < r2 [1,2,3,4,9] < r4 [1,2,3,5] < r1 [7,8,9,1] < r3 [7,8,9,2,3];
    # adjacent common prefixes 4, 3, 0, 3. One run saves 4 x 1 token; split at the 0:
    # {r0,r2,r4} saves 2 x 3 (capped at its shortest row, 4, minus 1) and {r1,r3} 1 x 3.
    ids, mask = padded([[1, 2, 3, 4, 5, 6], [7, 8, 9, 1], [1, 2, 3, 4, 9], [7, 8, 9, 2, 3], [1, 2, 3, 5]])
    p = prefix.plan(ids, mask)
    assert p.group == [0, 1, 0, 1, 0] and p.prefix == [3, 3] and p.first == [0, 1]


def test_plan_splits_prompts_that_share_only_a_header():
    # Two prompts behind a common 2-token header: one run saves 3 x 2 = 6 tokens, two
    # runs 1 x 6 + 1 x 4 = 10, so two groups with their full prompts as prefixes.
    ids, mask = padded([[1, 2, 9, 9, 9], [1, 2, 3, 4, 5, 6, 7], [1, 2, 9, 9, 8], [1, 2, 3, 4, 5, 6, 8]])
    p = prefix.plan(ids, mask)
    assert p.group == [1, 0, 1, 0] and p.prefix == [6, 4]


def test_plan_never_groups_rows_that_share_no_token():
    # Different first tokens: nothing to share, each row its own group running all but
    # its last token as the prefix.
    ids, mask = padded([[4, 5, 6, 7], [1, 2, 3]])
    p = prefix.plan(ids, mask)
    assert p.group == [1, 0] and p.prefix == [2, 3]


def test_unsorted_chunks_equal_plain_forward():
    # forward_logprobs runs chunks in row order: groups split, singletons mixed in.
    model = tiny_qwen2().eval()
    batch = grpo_like_batch(64, seed=3)
    for mb in batch.chunks(3):
        mb = mb.trim()
        with torch.no_grad():
            plain = microbatch.forward(model, mb, ForwardOptions(), with_entropy=True)
            shared = microbatch.forward(model, mb, ForwardOptions(share_prompt=True), with_entropy=True)
        torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(shared.entropy, plain.entropy, atol=1e-5, rtol=0)


def test_split_keeps_a_prompts_rows_together():
    # Groups interleaved and split across the natural order; sorted by tokens, micro-
    # batches of 2 hold one prompt each.
    ids, mask = padded([[5, 6, 1], [3, 4, 1], [5, 6, 2], [3, 4, 2, 2]])
    batch = TrainBatch(ids, mask, mask.float())
    parts = microbatch.split(batch, 2, 0, False, share_prompt=True)
    assert [mb.rows for mb in parts] == [[1, 3], [0, 2]]
    assert [mb.rows for mb in microbatch.split(batch, 2, 0, False)] == [[0, 1], [2, 3]]


def test_token_budget_fills_in_the_given_order():
    # Order 2, 0, 3, 1 (lengths 5, 12, 12, 9), budget 24 = rows x longest: [5, 12] costs
    # 24, adding 12 costs 36; [12, 9] costs 24.
    assert microbatch.plan_micro_batches([12, 9, 5, 12], 1, max_tokens=24, order=[2, 0, 3, 1]) == [[2, 0], [3, 1]]


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config)


def tiny_math():
    from transformers import AutoModelForCausalLM

    from rlpost.models.loading import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-math"), dtype=torch.float32)


def grpo_like_batch(vocab: int, seed: int) -> TrainBatch:
    """3 prompts of lengths 9, 6 and 12 with 3, 2 and 3 completions (lengths 1-7), rows
    shuffled; completion tokens trained with a per-row advantage."""
    g = torch.Generator().manual_seed(seed)
    rows, loss_rows = [], []
    for plen, n in [(9, 3), (6, 2), (12, 3)]:
        prompt = torch.randint(1, vocab, (plen,), generator=g).tolist()
        for _ in range(n):
            clen = int(torch.randint(1, 8, (1,), generator=g))
            rows.append(prompt + torch.randint(1, vocab, (clen,), generator=g).tolist())
            loss_rows.append([0.0] * plen + [1.0] * clen)
    perm = torch.randperm(len(rows), generator=g).tolist()
    rows, loss_rows = [rows[i] for i in perm], [loss_rows[i] for i in perm]
    ids, mask = padded(rows)
    loss_mask = torch.tensor([r + [0.0] * (ids.shape[1] - len(r)) for r in loss_rows])
    adv = torch.randn(len(rows), 1, generator=g).expand(-1, ids.shape[1]).contiguous()
    return TrainBatch(ids, mask, loss_mask, advantages=adv, global_num_tokens=float(loss_mask.sum()))


def loss_and_grads(model, batch: TrainBatch, opts: ForwardOptions, size: int):
    model.zero_grad(set_to_none=True)
    outs = []
    for mb in microbatch.split(batch, size, 0, False, opts.share_prompt):
        out = microbatch.forward(model, mb.batch, opts, with_entropy=True)
        loss = -(out.logprobs * mb.batch.advantages * mb.batch.loss_mask).sum() / mb.batch.global_num_tokens
        (loss + 0.1 * (out.entropy * mb.batch.loss_mask).sum() / mb.batch.global_num_tokens).backward()
        outs.append((mb.rows, out))
    shape = tuple(batch.input_ids.shape)
    out = ModelOutput(microbatch.scatter_rows([(r, o.logprobs.detach()) for r, o in outs], shape),
                      microbatch.scatter_rows([(r, o.entropy.detach()) for r, o in outs], shape))
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make_model", [tiny_qwen2, tiny_math], ids=["random_qwen2", "tiny_math"])
@pytest.mark.parametrize("size,temperature,chunk", [(8, 1.0, 0), (3, 0.7, 0), (5, 1.0, 7)],
                         ids=["one_micro_batch", "groups_split_tempered", "chunked"])
def test_shared_forward_equals_plain_forward(make_model, size, temperature, chunk):
    model = make_model().train()
    batch = grpo_like_batch(model.config.vocab_size, seed=size)
    # Sharing happens: one group per prompt, each prefix at least its prompt (9, 6, 12 tokens).
    p = prefix.plan(batch.input_ids, batch.attention_mask)
    assert len(p.prefix) == 3 and all(n >= m for n, m in zip(sorted(p.prefix), [6, 9, 12]))
    plain, plain_grads = loss_and_grads(model, batch, ForwardOptions(temperature, logprob_chunk_tokens=chunk), size)
    shared, shared_grads = loss_and_grads(
        model, batch, ForwardOptions(temperature, logprob_chunk_tokens=chunk, share_prompt=True), size)
    torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.entropy, plain.entropy, atol=1e-5, rtol=0)
    # The [B, T] contract: position 0 and padding hold 0.
    assert (shared.logprobs[:, 0] == 0).all() and (shared.logprobs[batch.attention_mask == 0] == 0).all()
    for name, g in plain_grads.items():
        scale = g.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(shared_grads[name] / scale, g / scale, atol=1e-5, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("override,reason", [
    ("trainer.packing=true", "trainer.packing"),
    ("algorithm.name=ppo", "critic"),
    ("model.gradient_checkpointing=true", "gradient_checkpointing"),
])
def test_config_refuses_what_share_prompt_cannot_run(override, reason):
    from rlpost.config.load import load_config
    from rlpost.errors import ConfigError

    assert load_config(["trainer.share_prompt=true"]).trainer.share_prompt
    load_config([override])  # fine without share_prompt
    with pytest.raises(ConfigError, match=rf"trainer\.share_prompt.*{reason}"):
        load_config(["trainer.share_prompt=true", override])


def test_auto_turns_sharing_on_only_where_it_applies_and_was_measured():
    from types import SimpleNamespace

    from rlpost.engines.prefix import enabled

    cpu, gpu = torch.device("cpu"), torch.device("meta")  # any non-CPU device stands for a GPU
    full = SimpleNamespace(layer_types=["full_attention"] * 2)
    assert enabled(None, cpu, packing=False, checkpointing=False, config=full)
    assert enabled(None, cpu, packing=False, checkpointing=False, config=SimpleNamespace())  # no layer_types
    assert not enabled(None, gpu, packing=False, checkpointing=False, config=full)
    assert not enabled(None, cpu, packing=True, checkpointing=False, config=full)
    assert not enabled(None, cpu, packing=False, checkpointing=True, config=full)
    hybrid = SimpleNamespace(layer_types=["full_attention", "sliding_attention"])
    assert not enabled(None, cpu, packing=False, checkpointing=False, config=hybrid)
    assert enabled(True, gpu, packing=False, checkpointing=False, config=hybrid)  # as set: errors are the forward's
    assert not enabled(False, cpu, packing=False, checkpointing=False, config=full)
