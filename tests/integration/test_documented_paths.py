"""Paths the docs promise, run through the real entry point (``rlpost.train.run``: Ray
actors, trainer group, reward pool, weight sync) on the built-in tiny model, each with
an assertion on what it must show. One Ray instance serves the module's runs."""

import json
import math
from pathlib import Path

import pytest
import torch

from rlpost.config.load import load_config
from rlpost.train import run

pytestmark = pytest.mark.integration

SMALL = ["+recipe=grpo_math", "data.train_batch_size=4", "rollout.n=2", "eval.every=0", "trainer.save_every=0",
         "reward.workers=1", "rollout.engine=hf"]


@pytest.fixture(scope="module")
def ray_cluster():
    from rlpost.workers.cluster import start_cluster, stop_cluster

    started = start_cluster(load_config([*SMALL, "ray.num_cpus=6"]))
    yield
    stop_cluster(started)


def _run(tmp_path: Path, name: str, *overrides: str) -> list[dict]:
    out = tmp_path / name
    run(load_config([*SMALL, f"output_dir={out}", *overrides]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_deepspeed_zero_1_2_3_take_the_same_first_step_as_fsdp2(ray_cluster, tmp_path):
    keys = ["policy/loss", "policy/grad_norm", "policy/kl", "reward/mean", "response/length_mean"]
    runs = {"fsdp2": _run(tmp_path, "fsdp2", "trainer.total_steps=1")}
    for stage in (1, 2, 3):
        runs[f"zero{stage}"] = _run(tmp_path, f"zero{stage}", "trainer.total_steps=1", "trainer.backend=deepspeed",
                                    f"trainer.zero_stage={stage}")
    ref = runs["fsdp2"][0]
    for name, rows in runs.items():
        assert rows[0]["step"] == 1
        for key in keys:  # same samples (same seed, same initial weights), same update
            assert math.isclose(rows[0][key], ref[key], rel_tol=1e-4, abs_tol=1e-6), (name, key, rows[0][key], ref[key])


def test_lora_trains_adapters_only_exports_a_merged_model_and_logs_to_wandb_offline(ray_cluster, tmp_path,
                                                                                    monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "lora"
    rows = _run(tmp_path, "lora", "trainer.total_steps=2", "model.lora.rank=4", "trainer.lr=1e-3",
                "logger=[console,jsonl,wandb]")
    assert [r["step"] for r in rows] == [1, 2]

    # The checkpoint holds the adapters and nothing of the frozen base.
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    saved = torch.load(latest / "policy" / "model.pt", map_location="cpu", weights_only=True)
    assert saved and all("lora_" in name for name in saved), sorted(saved)[:5]

    # final/ is a plain transformers model (adapters merged in): no peft names, and it
    # differs from the base it started from.
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in name for name in model.state_dict())
    base = AutoModelForCausalLM.from_pretrained(_model_path())
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all(n.endswith(".weight") for n in changed)

    # The offline wandb run folder a user would `wandb sync` holds the logged metrics.
    # wandb 0.31 ships no Python reader for its record file; each history item is stored
    # as its key and its JSON-encoded value, so both must appear in it.
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    for row in rows:
        for key in ("policy/loss", "policy/grad_norm", "reward/mean"):
            assert key.encode() in record and json.dumps(row[key]).encode() in record, (key, row[key])


def test_adaptive_kl_moves_its_coefficient_toward_the_target_with_cispo(ray_cluster, tmp_path):
    coef, target, horizon, batch = 0.05, 1e-3, 64, 4 * 2
    rows = _run(tmp_path, "kl", "trainer.total_steps=3", "algorithm.policy_loss=cispo", "algorithm.kl_in_reward=true",
                f"algorithm.kl_coef={coef}", f"algorithm.kl_target={target}", f"algorithm.kl_horizon={horizon}")
    assert rows[0]["reward/kl_penalty_coef"] == pytest.approx(coef)
    for prev, cur in zip(rows, rows[1:]):
        # Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
        error = min(max(prev["reward/seq_kl_mean"] / target - 1.0, -0.2), 0.2)
        assert cur["reward/kl_penalty_coef"] == pytest.approx(prev["reward/kl_penalty_coef"] * (1 + error * batch / horizon))
        # Toward the target: up while the KL is above it, down while below.
        moved = cur["reward/kl_penalty_coef"] - prev["reward/kl_penalty_coef"]
        assert moved != 0.0 and (moved > 0) == (prev["reward/seq_kl_mean"] > target)


def _model_path() -> str:
    from rlpost.models.loading import resolve_model_path

    return resolve_model_path("builtin:tiny-math")
