"""Every shipped recipe runs 2 real steps: the real controller, FSDP2 engine (one
gloo rank in this process), HF rollout engine and the recipe's algorithm, on the
built-in tiny model. In-process groups (rlpost.local) keep this fast; the Ray path
is covered by test_train_e2e.py. Recipes whose environment needs the sandbox service
get a local one (skipped, like tests/integration/test_sandbox.py, without bubblewrap)."""

import math
import shutil

import pytest

from rlpost.checkpoint import CheckpointManager
from rlpost.config.load import group_options, load_config
from rlpost.config.schema import JsonlLogConfig, LoggerConfig
from rlpost.step.controller import Controller
from rlpost.step.critic import critic_trainer_config
from rlpost.data.dataset import load_prompts
from rlpost.data.stream import PromptStream
from rlpost.engines.fsdp import FSDPEngine
from rlpost.engines.hf_rollout import HFRolloutEngine
from rlpost.local import LocalCriticGroup, LocalRewardPool, LocalRolloutGroup, LocalTrainerGroup, LocalWeightSync
from rlpost.models.loading import load_tokenizer, resolve_model_path
from rlpost.tracking import Tracker
from rlpost.train import cache_root

pytestmark = pytest.mark.integration


NEEDS_SANDBOX = {"grpo_terminal"}  # env.kwargs.sandbox_url is required


@pytest.fixture(scope="module")
def model_path():
    return resolve_model_path("builtin:tiny-math")


@pytest.fixture(scope="module")
def sandbox():
    """Starts a sandbox server on first use; yields a function returning its URL."""
    started = []

    def url():
        if shutil.which("bwrap") is None:
            pytest.skip("bubblewrap (bwrap) not installed: apt-get install bubblewrap")
        if not started:
            from rlpost.sandbox.server import start_local

            started.append(start_local(0))
        return started[0][1]

    yield url
    if started:
        from rlpost.sandbox.server import stop_local

        stop_local(started[0][0])


@pytest.mark.parametrize("recipe", group_options("recipe"))
def test_recipe_runs_two_steps(recipe, process_group, model_path, sandbox, tmp_path):
    extra = [f"env.kwargs.sandbox_url={sandbox()}"] if recipe in NEEDS_SANDBOX else []
    cfg = load_config([f"+recipe={recipe}", "trainer.total_steps=2", "data.train_batch_size=4",
                       "rollout.n=4", "eval.every=0", "trainer.save_every=0", f"output_dir={tmp_path}", *extra])
    if cfg.model.path != "builtin:tiny-math":  # e.g. grpo_math_tool's builtin:tiny-math-tool
        model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path)
    train, _ = load_prompts(cfg.data, tokenizer, "train", seed=cfg.seed, data_dir=cache_root() / "data")
    use_reference = cfg.algorithm.kl_coef > 0
    temperature = cfg.rollout.temperature
    policy = FSDPEngine(model_path, cfg.model, cfg.trainer, seed=cfg.seed, logit_temperature=temperature)
    reference = (FSDPEngine(model_path, cfg.model, None, trainable=False, logit_temperature=temperature)
                 if use_reference else None)
    rollout = HFRolloutEngine(model_path, seed=cfg.seed)
    critic = None
    if cfg.algorithm.adv_estimator == "gae":  # PPO: the value model on the same base
        critic = LocalCriticGroup(FSDPEngine(model_path, cfg.model, critic_trainer_config(cfg), seed=cfg.seed,
                                             head="value"), micro_batch_size=cfg.trainer.micro_batch_size)
    tracker = Tracker(LoggerConfig(jsonl=JsonlLogConfig()), tmp_path, 2, {})
    controller = Controller(
        cfg, trainer=LocalTrainerGroup(policy, reference, micro_batch_size=cfg.trainer.micro_batch_size),
        rollout=LocalRolloutGroup([rollout]), rewards=LocalRewardPool(cfg.reward),
        weight_sync=LocalWeightSync(policy, [rollout]),
        stream=PromptStream(train, cfg.data.train_batch_size, seed=cfg.seed), val_samples=[],
        tracker=tracker, checkpoints=CheckpointManager(tmp_path / "checkpoints", 1), pad_id=tokenizer.pad_token_id,
        use_reference=use_reference, critic=critic)
    last = controller.run(0)
    assert rollout.policy_version == 2
    assert last["policy/updates"] == cfg.trainer.mini_batches
    assert math.isfinite(last["policy/loss"]) and last["policy/skipped"] == 0.0
    assert ("policy/kl" in last) == use_reference
    assert (tmp_path / "checkpoints" / "step_000002" / "controller.json").is_file()
    if critic is not None:
        assert last["critic/updates"] == cfg.trainer.mini_batches and last["critic/skipped"] == 0.0
        assert math.isfinite(last["critic/vf_loss"]) and math.isfinite(last["critic/explained_variance"])
        assert (tmp_path / "checkpoints" / "step_000002" / "critic" / "model.pt").is_file()
