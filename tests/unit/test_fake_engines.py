"""The fakes that ship with the engine interfaces behave like engines."""

import math

import pytest
import torch

from rlpost.engines.fake import FakeRolloutEngine, FakeTrainEngine, digits_decode
from rlpost.types import SamplingParams, TrainBatch

PROMPTS = [[5, 6, 7], [8], [9, 10]]


def test_fake_rollout_shapes_and_finish_reasons():
    engine = FakeRolloutEngine(vocab_size=50, eos_id=3, seed=0)
    out = engine.generate(PROMPTS, SamplingParams(n=8, max_new_tokens=6))
    assert [len(group) for group in out] == [8, 8, 8]
    reasons = set()
    for group in out:
        for c in group:
            assert 1 <= len(c.token_ids) <= 6
            assert c.logprobs == (-math.log(50),) * len(c.token_ids)
            assert 3 not in c.token_ids[:-1] and all(0 <= t < 50 for t in c.token_ids)
            assert c.finish_reason == ("stop" if c.token_ids[-1] == 3 else "length")
            if c.finish_reason == "length":
                assert len(c.token_ids) == 6
            assert c.text == digits_decode([t for t in c.token_ids if t != 3])
            assert c.policy_version == 0
            reasons.add(c.finish_reason)
    assert reasons == {"stop", "length"}


def test_fake_rollout_is_deterministic_and_seeded():
    params = SamplingParams(n=4, max_new_tokens=8)
    a, b = FakeRolloutEngine(seed=1), FakeRolloutEngine(seed=1)
    calls = [a.generate(PROMPTS, params) for _ in range(2)]
    assert calls == [b.generate(PROMPTS, params) for _ in range(2)]
    assert calls[0] != calls[1]  # like a real sampler, a second call draws new samples
    assert FakeRolloutEngine(seed=2).generate(PROMPTS, params) != calls[0]
    pinned = SamplingParams(n=4, max_new_tokens=8, seed=3)
    assert a.generate(PROMPTS, pinned) == b.generate(PROMPTS, pinned) == a.generate(PROMPTS, pinned)
    greedy = a.generate(PROMPTS, SamplingParams(n=3, temperature=0.0, max_new_tokens=8))
    assert all(group[0] == group[1] == group[2] for group in greedy)


def test_fake_rollout_weight_update_sets_version_and_changes_outputs():
    engine = FakeRolloutEngine(seed=0)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    before = engine.generate(PROMPTS, greedy)
    consumed = []

    def stream():
        for name in ("a", "b"):
            consumed.append(name)
            yield name, torch.zeros(1)

    engine.update_weights(stream(), 7)
    assert consumed == ["a", "b"] and engine.last_weight_names == ["a", "b"]
    after = engine.generate(PROMPTS, greedy)
    assert engine.policy_version == 7 and all(g[0].policy_version == 7 for g in after)
    assert after != before


def test_fake_rollout_stop_string_and_injected_decode():
    letters = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)  # noqa: E731
    engine = FakeRolloutEngine(vocab_size=26, eos_id=0, seed=0, decode=letters, length_fraction=1.0)
    for group in engine.generate(PROMPTS, SamplingParams(n=8, max_new_tokens=40, stop=("e",))):
        for c in group:
            assert c.text == letters(c.token_ids)
            if c.finish_reason == "stop":  # cut right after the first "e"
                assert c.text.endswith("e") and "e" not in c.text[:-1]
            else:
                assert "e" not in c.text and len(c.token_ids) == 40


def _batch(rows: list[list[int]], width: int) -> TrainBatch:
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    loss_mask = mask.float()
    loss_mask[:, 0] = 0
    return TrainBatch(input_ids=ids, attention_mask=mask, loss_mask=loss_mask,
                      global_num_tokens=float(loss_mask.sum()))


def _nll(output, batch):
    """Token-mean negative log-likelihood, normalised by the step's token count."""
    loss = -(output.logprobs * batch.loss_mask).sum() / batch.global_num_tokens
    return loss, {"loss": loss.item()}


def test_fake_train_logprobs_follow_the_token_alignment():
    engine = FakeTrainEngine(vocab_size=8)
    with torch.no_grad():
        engine.model.table.weight.zero_()  # uniform next-token distribution
    batch = _batch([[1, 2, 3], [4, 5]], width=4)
    out = engine.forward_logprobs(batch, with_entropy=True)
    expected = torch.tensor([[0.0, -math.log(8), -math.log(8), 0.0], [0.0, -math.log(8), 0.0, 0.0]])
    torch.testing.assert_close(out.logprobs, expected)
    torch.testing.assert_close(out.entropy, -expected)  # entropy of uniform over 8 = log 8


def test_fake_train_loss_decreases_and_microbatches_do_not_change_the_step():
    batch = _batch([[1, 2, 3, 4], [1, 2, 5], [6, 7, 1, 2], [3, 3]], width=4)
    engine = FakeTrainEngine(vocab_size=8, lr=0.1, seed=0)
    losses = [engine.train_step(batch, _nll, micro_batch_size=4)["loss"] for _ in range(10)]
    assert losses[-1] < losses[0] - 0.5
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))

    whole, split = FakeTrainEngine(vocab_size=8, seed=0), FakeTrainEngine(vocab_size=8, seed=0)
    m_whole = whole.train_step(batch, _nll, micro_batch_size=4)
    m_split = split.train_step(batch, _nll, micro_batch_size=1)
    assert m_whole["loss"] == pytest.approx(m_split["loss"])  # metrics sum over micro-batches
    assert m_whole["grad_norm"] == pytest.approx(m_split["grad_norm"])
    torch.testing.assert_close(whole.model.table.weight, split.model.table.weight)


def test_fake_train_nan_loss_skips_the_update():
    engine = FakeTrainEngine(vocab_size=8)
    before = engine.model.table.weight.detach().clone()
    metrics = engine.train_step(_batch([[1, 2]], 2), lambda out, b: (out.logprobs.sum() * float("nan"), {}), 1)
    assert metrics["skipped"] == 1.0 and engine.step == 0
    torch.testing.assert_close(engine.model.table.weight, before)


def test_fake_train_save_load_and_weights_reach_a_rollout_engine(tmp_path):
    batch = _batch([[1, 2, 3]], width=3)
    engine = FakeTrainEngine(vocab_size=8, lr=0.1)
    engine.train_step(batch, _nll, 1)
    engine.save(str(tmp_path / "ckpt"))
    restored = FakeTrainEngine(vocab_size=8, lr=0.1, seed=99)
    restored.load(str(tmp_path / "ckpt"))
    assert restored.step == 1
    assert engine.train_step(batch, _nll, 1) == restored.train_step(batch, _nll, 1)  # optimizer state too

    rollout = FakeRolloutEngine(vocab_size=8, eos_id=0)
    rollout.update_weights(engine.named_full_weights(), version=2)
    assert rollout.policy_version == 2 and rollout.last_weight_names == ["table.weight"]
