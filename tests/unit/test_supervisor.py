"""``TrainerSupervisor``: a trainer group that dies is rebuilt from the latest
checkpoint and the run ends as if nothing happened; past ``trainer.max_restarts``
the run stops with a message naming the key. Real controller, shipped fakes, the
in-process groups of ``rlpost.local``; no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlpost.checkpoint import CheckpointManager
from rlpost.config.convert import to_dict
from rlpost.config.load import load_config
from rlpost.step.controller import Controller
from rlpost.data.stream import PromptStream
from rlpost.engines.fake import FakeRolloutEngine, FakeTrainEngine
from rlpost.errors import TrainerLost, WorkerError
from rlpost.faults import FaultCounts
from rlpost.local import LocalRewardPool, LocalRolloutGroup, LocalTrainerGroup, LocalWeightSync
from rlpost.step.supervisor import TrainerParts, TrainerSupervisor
from rlpost.tracking import Tracker
from rlpost.types import PromptSample

THIS_FILE = Path(__file__).resolve()
VOCAB, EOS, PAD = 16, 2, 0


def letter_reward(prompt, completion, ground_truth, metadata):
    return float(completion.startswith(ground_truth)) + completion.count(ground_truth) / max(len(completion), 1)


def letters(ids) -> str:
    return "".join(chr(ord("a") + t) for t in ids)


class DyingTrainer(LocalTrainerGroup):
    """Raises ``TrainerLost`` on its ``die_at``-th ``train_step`` call, like a
    TrainerGroup whose rank was killed; ``kill()`` records the teardown."""

    def __init__(self, engine, die_at: int | None, **kwargs):
        super().__init__(engine, **kwargs)
        self.die_at, self.calls, self.killed = die_at, 0, False

    def train_step(self, batch, loss_fn, **kwargs):
        self.calls += 1
        if self.calls == self.die_at:
            raise TrainerLost("trainer.train_step: an actor died (ActorDiedError)")
        return super().train_step(batch, loss_fn, **kwargs)

    def kill(self) -> None:
        self.killed = True

    def shutdown(self) -> None:
        pass


def run_supervised(out: Path, deaths: list[int | None], max_restarts: int = 1):
    """Trains 4 steps (checkpoint every 2); the k-th trainer group built dies at its
    ``deaths[k]``-th update (None: never). Returns (supervisor, trainers, final policy)."""
    cfg = load_config([
        "logger=[jsonl]", f"output_dir={out}", "seed=5", "rollout.engine=fake", "rollout.replicas=2",
        "rollout.n=4", "rollout.max_new_tokens=8", "data.train_batch_size=2", "trainer.total_steps=4",
        "trainer.save_every=2", "trainer.lr=0.05", "eval.every=0", f"trainer.max_restarts={max_restarts}",
        f"reward.fn='{THIS_FILE}:letter_reward'",
    ])
    out.mkdir(parents=True)
    samples = [PromptSample(uid=f"p{i}", prompt_ids=(1, 3 + i, 5 + i), question=f"q{i}", answer="abde"[i])
               for i in range(4)]
    # Rollout engines and reward pool outlive the trainer, as the Ray groups do.
    engines = [FakeRolloutEngine(vocab_size=VOCAB, eos_id=EOS, seed=cfg.seed + 1000 * i, decode=letters)
               for i in range(2)]
    rollout, rewards = LocalRolloutGroup(engines), LocalRewardPool(cfg.reward)
    tracker = Tracker(cfg.logger, out, cfg.trainer.total_steps, to_dict(cfg))
    checkpoints = CheckpointManager(out / "checkpoints", cfg.trainer.keep_last)
    faults, trainers = FaultCounts(), []

    def build_trainer():
        policy = FakeTrainEngine(vocab_size=VOCAB, lr=cfg.trainer.lr, seed=cfg.seed)
        trainer = DyingTrainer(policy, deaths[len(trainers)], micro_batch_size=16)
        trainers.append(trainer)
        return TrainerParts(trainer, LocalWeightSync(policy, engines))

    def make_controller(parts):
        stream = PromptStream(samples, cfg.data.train_batch_size, seed=cfg.seed)
        return Controller(cfg, trainer=parts.trainer, rollout=rollout, rewards=rewards, weight_sync=parts.weight_sync,
                          stream=stream, val_samples=samples, tracker=tracker, checkpoints=checkpoints,
                          pad_id=PAD, use_reference=False, faults=faults)

    supervisor = TrainerSupervisor(build_trainer=build_trainer, make_controller=make_controller,
                                   checkpoints=checkpoints, tracker=tracker, max_restarts=max_restarts, faults=faults)
    supervisor.run(None, lambda: False, finish=lambda trainer: None)
    return supervisor, trainers, dict(trainers[-1].engine.named_full_weights())


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


KEYS = ["reward/mean", "reward/std", "policy/loss", "policy/grad_norm", "policy/entropy", "rollout/policy_version"]


def test_trainer_lost_after_a_checkpoint_is_rebuilt_from_it_and_matches_an_uninterrupted_run(tmp_path):
    _, _, expected_weights = run_supervised(tmp_path / "whole", [None])
    expected = rows(tmp_path / "whole")

    # The first group dies in step 3's update (its third train_step; one per step),
    # after the step-2 checkpoint: the rebuilt group loads step 2 and redoes 3 and 4.
    supervisor, trainers, weights = run_supervised(tmp_path / "cut", [3, None])
    got = rows(tmp_path / "cut")
    assert len(trainers) == 2 and trainers[0].killed and not trainers[1].killed
    assert trainers[1].calls == 2  # steps 3 and 4 only: steps 1-2 came from the checkpoint
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # each step once
    assert [r["trainer/restarts"] for r in got] == [0.0, 0.0, 1.0, 1.0]
    assert [{k: r[k] for k in KEYS} for r in got] == [{k: r[k] for k in KEYS} for r in expected]
    assert weights.keys() == expected_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], expected_weights[name]), name
    # The weights moved, so a rebuild that lost the checkpoint would not match.
    assert len({r["policy/entropy"] for r in expected}) == 4


def test_trainer_lost_before_any_checkpoint_restarts_from_the_initial_weights(tmp_path):
    _, _, expected_weights = run_supervised(tmp_path / "whole", [None])
    _, trainers, weights = run_supervised(tmp_path / "cut", [2, None])  # dies in step 2
    got = rows(tmp_path / "cut")
    assert trainers[1].calls == 4 and [r["step"] for r in got] == [1, 2, 3, 4]
    assert [{k: r[k] for k in KEYS} for r in got] == [{k: r[k] for k in KEYS} for r in rows(tmp_path / "whole")]
    assert all(torch.equal(weights[n], expected_weights[n]) for n in weights)


def test_trainer_lost_more_than_max_restarts_stops_with_a_message_naming_the_key(tmp_path):
    with pytest.raises(WorkerError, match=r"trainer.max_restarts=1") as err:
        run_supervised(tmp_path / "run", [3, 1], max_restarts=1)
    assert not isinstance(err.value, TrainerLost)  # final: the caller must not rebuild again
