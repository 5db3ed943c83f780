"""The FSDP2 engine as a PPO value model (``head="value"``) on the built-in tiny model,
one gloo rank in this process: fresh head at zero, values aligned with the token
convention of rlpost.types, the clipped value loss trains it, save/load round-trips."""

import dataclasses

import pytest
import torch

from rlpost.algorithms import make_value_loss_fn
from rlpost.config.schema import AlgorithmConfig, ModelConfig, TrainerConfig
from rlpost.engines.fsdp import FSDPEngine
from rlpost.models.loading import resolve_model_path
from rlpost.types import TrainBatch

pytestmark = pytest.mark.integration


def critic(lr: float = 1e-3) -> FSDPEngine:
    path = resolve_model_path("builtin:tiny-math")
    return FSDPEngine(path, ModelConfig(), TrainerConfig(lr=lr, micro_batch_size=2), head="value")


def batch() -> TrainBatch:
    """Row 1 is row 0's first four tokens, right-padded."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    loss_mask = torch.tensor([[0.0, 0, 1, 1, 1, 1], [0.0, 0, 1, 1, 0, 0]])
    return TrainBatch(input_ids=ids, attention_mask=attention, loss_mask=loss_mask,
                      global_num_tokens=float(loss_mask.sum()), global_num_seqs=2.0)


def fit(engine: FSDPEngine, data: TrainBatch, steps: int) -> list[float]:
    """``steps`` updates towards returns of 1 on every trained token; the losses."""
    data.old_values = engine.forward_values(data).values * data.loss_mask
    data.returns = data.loss_mask.clone()
    loss_fn = make_value_loss_fn(AlgorithmConfig(value_clip=None))
    return [engine.train_step(data, loss_fn, micro_batch_size=1)["critic/vf_loss"] for _ in range(steps)]


def test_fresh_head_starts_at_zero_and_values_are_causal(process_group):
    engine = critic()
    data = batch()
    assert torch.equal(engine.forward_values(data).values, torch.zeros(2, 6))
    fit(engine, data, steps=3)
    values = engine.forward_values(data).values
    # values[:, t] sees tokens :t only: row 1 shares row 0's first four tokens, so the
    # values of its four real positions match; position 0 and padding are 0.
    assert values[:, 0].tolist() == [0.0, 0.0] and values[1, 4:].tolist() == [0.0, 0.0]
    assert torch.allclose(values[0, :4], values[1, :4], atol=1e-5)
    assert values[0, 1:].abs().min() > 0
    # Changing token 3 changes values from position 4 on, never before.
    changed = dataclasses.replace(data, input_ids=data.input_ids.clone())
    changed.input_ids[0, 3] = 11
    after = engine.forward_values(changed).values
    assert torch.equal(after[0, :4], values[0, :4]) and not torch.allclose(after[0, 4:], values[0, 4:])


def test_value_loss_goes_down_and_checkpoint_round_trips(process_group, tmp_path):
    engine = critic(lr=3e-3)
    data = batch()
    losses = fit(engine, data, steps=8)
    # Targets 1 from values 0: the first loss is 0.5 * 1^2 per token.
    assert losses[0] == pytest.approx(0.5, abs=1e-6)
    assert losses[-1] < 0.5 * losses[0]
    engine.save(str(tmp_path / "critic"))
    saved = engine.forward_values(data).values
    fit(engine, data, steps=2)
    assert not torch.equal(engine.forward_values(data).values, saved)
    engine.load(str(tmp_path / "critic"))
    assert torch.equal(engine.forward_values(data).values, saved)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_critic_fits_like_the_fsdp2_critic(process_group, stage):
    """trainer.backend=deepspeed gives PPO's critic a DeepSpeed engine: the same fresh
    head at zero, the same losses and values after the same updates as FSDP2's."""
    from rlpost.engines.deepspeed import DeepSpeedEngine

    path = resolve_model_path("builtin:tiny-math")
    deepspeed = DeepSpeedEngine(path, ModelConfig(), TrainerConfig(backend="deepspeed", zero_stage=stage, lr=3e-3,
                                                                   micro_batch_size=2), head="value")
    fsdp = critic(lr=3e-3)
    assert torch.equal(deepspeed.forward_values(batch()).values, torch.zeros(2, 6))
    ds_data, fsdp_data = batch(), batch()
    ds_losses, fsdp_losses = fit(deepspeed, ds_data, steps=3), fit(fsdp, fsdp_data, steps=3)
    assert ds_losses[0] > ds_losses[-1]
    assert ds_losses == pytest.approx(fsdp_losses, rel=1e-4, abs=1e-7)
    assert torch.allclose(deepspeed.forward_values(ds_data).values, fsdp.forward_values(fsdp_data).values, atol=1e-5)
