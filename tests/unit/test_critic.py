"""PPO's critic stages (rlpost.step.critic) with the shipped fakes: GAE on a hand-computed
2-row example, the KL penalty on every token, whitening, critic warm-up leaving the
policy untouched, and the critic in checkpoints. No Ray, no model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlpost.checkpoint import CheckpointManager, read_state
from rlpost.config.convert import to_dict
from rlpost.config.load import load_config
from rlpost.step.controller import Controller
from rlpost.step.critic import CriticStages
from rlpost.data.stream import PromptStream
from rlpost.engines.fake import FakeRolloutEngine, FakeTrainEngine, FakeValueEngine
from rlpost.errors import ConfigError
from rlpost.local import LocalCriticGroup, LocalRewardPool, LocalRolloutGroup, LocalTrainerGroup, LocalWeightSync
from rlpost.tracking import Tracker
from rlpost.types import PromptSample, TrainBatch

THIS_FILE = Path(__file__).resolve()
VOCAB, EOS, PAD = 16, 2, 0


def first_token_reward(prompt, completion, ground_truth, metadata):
    """Never 0, so that a critic starting at 0 always has something to learn."""
    return 1.0 + float(completion[:1] == ground_truth)


def ppo_cfg(out: Path, *overrides: str):
    return load_config([
        "logger=[jsonl]", f"output_dir={out}", "seed=1", "algorithm.adv_estimator=gae",
        "rollout.engine=fake", "rollout.n=2", "rollout.max_new_tokens=4", "data.train_batch_size=2",
        "trainer.total_steps=3", "trainer.micro_batch_size=3", "eval.every=0",
        f"reward.fn='{THIS_FILE}:first_token_reward'", *overrides,
    ])


def two_rows() -> TrainBatch:
    """Row 0: prompt [1], completion [3, 4, 5]. Row 1: prompt [1], completion [3, 4], padded."""
    return TrainBatch(input_ids=torch.tensor([[1, 3, 4, 5], [1, 3, 4, PAD]]),
                      attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
                      loss_mask=torch.tensor([[0.0, 1, 1, 1], [0.0, 1, 1, 0]]))


def stages(cfg, init_value: float) -> CriticStages:
    return CriticStages.of(cfg, LocalCriticGroup(FakeValueEngine(VOCAB, init_value=init_value), micro_batch_size=1))


def test_gae_advantages_and_returns_by_hand(tmp_path):
    cfg = ppo_cfg(tmp_path, "algorithm.gae_gamma=1.0", "algorithm.gae_lambda=0.5",
                  "algorithm.whiten_advantages=false")
    batch = two_rows()
    stages(cfg, init_value=0.5).advantages(batch, torch.tensor([1.0, 0.0]), kl_coef=0.0)
    # V = 0.5 on every completion state. Row 0 (reward 1 on its last token):
    # delta = (0, 0, 1 - 0.5); A_t = delta_t + 0.5 A_{t+1} = (0.125, 0.25, 0.5); R = A + V.
    # Row 1 (reward 0): delta = (0, -0.5); A = (-0.25, -0.5); R = (0.25, 0).
    assert batch.old_values.tolist() == [[0, 0.5, 0.5, 0.5], [0, 0.5, 0.5, 0]]
    assert batch.advantages.tolist() == [[0, 0.125, 0.25, 0.5], [0, -0.25, -0.5, 0]]
    assert batch.returns.tolist() == [[0, 0.625, 0.75, 1.0], [0, 0.25, 0.0, 0]]


def test_kl_penalty_lands_on_every_token(tmp_path):
    cfg = ppo_cfg(tmp_path, "algorithm.kl_in_reward=true", "algorithm.kl_coef=0.1", "algorithm.kl_estimator=k1",
                  "algorithm.gae_lambda=1.0", "algorithm.whiten_advantages=false")
    batch = two_rows()
    batch.old_logprobs = -torch.ones(2, 4) * batch.loss_mask
    batch.ref_logprobs = -2 * torch.ones(2, 4) * batch.loss_mask  # k1 KL = 1 per token
    stages(cfg, init_value=0.0).advantages(batch, torch.tensor([1.0, 0.0]), kl_coef=0.1)
    # Token rewards: row 0 (-0.1, -0.1, 0.9), row 1 (-0.1, -0.1); V = 0, lam = gamma = 1:
    # the advantage is the reward to go.
    assert batch.advantages == pytest.approx(torch.tensor([[0, 0.7, 0.8, 0.9], [0, -0.2, -0.1, 0]]))


def test_whitened_advantages_have_zero_mean_unit_std(tmp_path):
    batch = two_rows()
    stages(ppo_cfg(tmp_path), init_value=0.3).advantages(batch, torch.tensor([1.0, 0.0]), kl_coef=0.0)
    adv = batch.advantages[batch.loss_mask.bool()]
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert adv.std().item() == pytest.approx(1.0, abs=1e-5)
    assert (batch.advantages[~batch.loss_mask.bool()] == 0).all()


def build(cfg, critic_engine: FakeValueEngine) -> Controller:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = FakeTrainEngine(vocab_size=VOCAB, lr=cfg.trainer.lr, seed=cfg.seed)
    rollout = FakeRolloutEngine(vocab_size=VOCAB, eos_id=EOS, seed=cfg.seed, decode=lambda ids: "".join(map(str, ids)))
    samples = [PromptSample(uid=f"p{i}", prompt_ids=(1, 3 + i), question=f"q{i}", answer=str(5 + i))
               for i in range(2)]
    return Controller(
        cfg, trainer=LocalTrainerGroup(policy, micro_batch_size=cfg.trainer.micro_batch_size),
        rollout=LocalRolloutGroup([rollout]), rewards=LocalRewardPool(cfg.reward),
        weight_sync=LocalWeightSync(policy, [rollout]),
        stream=PromptStream(samples, cfg.data.train_batch_size, seed=cfg.seed), val_samples=[],
        tracker=Tracker(cfg.logger, out, cfg.trainer.total_steps, to_dict(cfg)),
        checkpoints=CheckpointManager(out / "checkpoints", 2), pad_id=PAD, use_reference=False,
        critic=LocalCriticGroup(critic_engine, micro_batch_size=cfg.trainer.micro_batch_size))


def test_critic_warmup_trains_only_the_critic(tmp_path):
    cfg = ppo_cfg(tmp_path, "critic.warmup_steps=1", "critic.lr=0.05")
    critic = FakeValueEngine(VOCAB, lr=cfg.critic.lr)
    controller = build(cfg, critic)
    policy0 = controller.trainer.engine.model.table.weight.clone()
    critic0 = critic.model.table.weight.clone()

    first = controller.step(1)
    assert first["policy/updates"] == 0.0 and "policy/loss" not in first
    assert torch.equal(controller.trainer.engine.model.table.weight, policy0)
    assert first["critic/updates"] == 1.0 and not torch.equal(critic.model.table.weight, critic0)
    # The critic starts at 0 everywhere, so its pre-update values are all 0.
    assert first["critic/old_values_mean"] == 0.0
    assert {"critic/vf_loss", "critic/vf_clip_frac", "critic/explained_variance", "critic/grad_norm"} <= first.keys()

    second = controller.step(2)
    assert second["policy/updates"] == 1.0 and second["critic/updates"] == 1.0
    assert not torch.equal(controller.trainer.engine.model.table.weight, policy0)


def test_critic_is_saved_and_restored(tmp_path):
    cfg = ppo_cfg(tmp_path / "a", "critic.lr=0.05")
    critic = FakeValueEngine(VOCAB, lr=cfg.critic.lr)
    controller = build(cfg, critic)
    for step in (1, 2):
        controller.step(step)
    controller.save(2)
    path = controller.checkpoints.latest()
    assert (path / "critic").is_dir()

    fresh = FakeValueEngine(VOCAB, lr=cfg.critic.lr)
    resumed = build(ppo_cfg(tmp_path / "b", "critic.lr=0.05"), fresh)
    resumed.restore(path, read_state(path))
    assert torch.equal(fresh.model.table.weight, critic.model.table.weight)
    assert fresh.step == critic.step == 2  # optimizer steps, restored with the optimizer state


def test_gae_without_a_critic_is_refused(tmp_path):
    cfg = ppo_cfg(tmp_path)
    with pytest.raises(ConfigError, match="needs a critic"):
        Controller(cfg, trainer=None, rollout=None, rewards=None, weight_sync=None, stream=None, val_samples=[],
                   tracker=None, checkpoints=None, pad_id=PAD, use_reference=False)
