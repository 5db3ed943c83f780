"""Micro-batch planning, sequence packing and chunked log-probs (rlpost.engines.microbatch,
packing, logprobs) on a tiny random Qwen2 in this process: no process group needed."""

from __future__ import annotations

import pytest
import torch

from rlpost.engines import microbatch, packing
from rlpost.engines.logprobs import sequence_logprobs
from rlpost.engines.microbatch import ForwardOptions, plan_micro_batches
from rlpost.types import ModelOutput, TrainBatch

LENGTHS = [12, 9, 5, 12, 7, 10, 3, 11]


def test_fixed_plan_keeps_order():
    assert plan_micro_batches(LENGTHS, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_token_budget_plan_padded_cost():
    # Longest first: 12, 12, 11, 10, 9, 7, 5, 3 (indices 0, 3, 7, 5, 1, 4, 2, 6).
    # Budget 36 = rows x longest: [12,12,11] costs 36; [10,9,7] 30, adding 5 -> 40;
    # [5,3] 10.
    assert plan_micro_batches(LENGTHS, 1, max_tokens=36) == [[0, 3, 7], [5, 1, 4], [2, 6]]


def test_token_budget_plan_packed_cost_and_oversized_rows():
    # Packed cost is the sum of lengths: 12+12=24 <= 25, +11 > 25; 11+10=21, +9 > 25; 9+7+5=21, +3=24.
    assert plan_micro_batches(LENGTHS, 1, max_tokens=25, packed=True) == [[0, 3], [7, 5], [1, 4, 2, 6]]
    # A row longer than the budget still runs, alone.
    plan = plan_micro_batches(LENGTHS, 1, max_tokens=4)
    assert sorted(i for mb in plan for i in mb) == list(range(8))
    assert [0] in plan and all(len(mb) == 1 or sum(LENGTHS[i] for i in mb) <= 4 for mb in plan)


def test_pack_unpack_round_trip():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = (ids != 0).long()
    rows = packing.pack(ids, mask)
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert packing.packed_logprob_mask(rows).tolist() == [[0, 1, 1, 0, 1, 0, 1, 1, 1]]
    torch.testing.assert_close(packing.unpack(rows.input_ids.float(), rows), (ids * mask).float())


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).eval()


def make_batch() -> TrainBatch:
    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor(LENGTHS)
    T = int(lengths.max())
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 64, (len(LENGTHS), T), generator=g) * mask
    loss_mask = mask.float()
    loss_mask[:, :2] = 0
    adv = torch.randn(len(LENGTHS), 1, generator=g).expand(-1, T).contiguous()
    return TrainBatch(ids, mask, loss_mask, advantages=adv, global_num_tokens=float(loss_mask.sum()))


def token_mean_loss(out: ModelOutput, mb: TrainBatch) -> torch.Tensor:
    return -(out.logprobs * mb.advantages * mb.loss_mask).sum() / mb.global_num_tokens


def reference_logprobs(model, batch: TrainBatch) -> torch.Tensor:
    """Each row alone, unpadded: no padding or neighbour can leak in."""
    out = torch.zeros(batch.input_ids.shape)
    for b in range(batch.size):
        n = int(batch.attention_mask[b].sum())
        logits = model(input_ids=batch.input_ids[b:b + 1, :n]).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, batch.input_ids[b, 1:n, None])[:, 0]
        out[b, 1:n] = lp
    return out


@pytest.mark.parametrize("opts", [ForwardOptions(), ForwardOptions(packing=True),
                                  ForwardOptions(logprob_chunk_tokens=7),
                                  ForwardOptions(packing=True, logprob_chunk_tokens=5)],
                         ids=["padded", "packed", "chunked", "packed_chunked"])
def test_forward_matches_rows_run_alone(model, opts):
    batch = make_batch()
    with torch.no_grad():
        out = microbatch.forward(model, batch, opts, with_entropy=True)
    torch.testing.assert_close(out.logprobs, reference_logprobs(model, batch), atol=1e-5, rtol=0)
    assert (out.entropy[batch.attention_mask == 0] == 0).all() and (out.entropy[:, 0] == 0).all()
    assert (out.entropy[:, 1:][batch.attention_mask[:, 1:] == 1] > 0).all()


def _grads(model, batch, opts, micro_batch_size, max_tokens):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for mb in microbatch.split(batch, micro_batch_size, max_tokens, opts.packing):
        loss = token_mean_loss(microbatch.forward(model, mb.batch, opts, with_entropy=False), mb.batch)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packing_and_token_budget_give_the_same_loss_and_gradient(model):
    batch = make_batch()
    loss0, grads0 = _grads(model, batch, ForwardOptions(), micro_batch_size=8, max_tokens=0)
    for opts, size, budget in [(ForwardOptions(), 3, 0), (ForwardOptions(), 1, 36),
                               (ForwardOptions(packing=True), 8, 0), (ForwardOptions(packing=True), 1, 25),
                               (ForwardOptions(packing=True, logprob_chunk_tokens=6), 1, 25)]:
        loss, grads = _grads(model, batch, opts, size, budget)
        assert loss == pytest.approx(loss0, rel=1e-5, abs=1e-7)
        for name, g in grads.items():
            torch.testing.assert_close(g, grads0[name], atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_chunked_logprobs_equal_unchunked_with_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    full = sequence_logprobs(logits, ids, mask, with_entropy=True)
    (full.logprobs.sum() + full.entropy.sum()).backward()
    g_full = logits.grad.clone()
    logits.grad = None
    chunked = sequence_logprobs(logits, ids, mask, with_entropy=True, chunk_tokens=4)
    (chunked.logprobs.sum() + chunked.entropy.sum()).backward()
    torch.testing.assert_close(chunked.logprobs, full.logprobs)
    torch.testing.assert_close(chunked.entropy, full.entropy)
    torch.testing.assert_close(logits.grad, g_full)
    # Formula check at one position: log softmax(z)[target].
    z = logits[0, 2].detach()
    assert chunked.logprobs[0, 3].item() == pytest.approx(torch.log_softmax(z, -1)[ids[0, 3]].item(), abs=1e-6)
