"""LoRA in DeepSpeedEngine (ZeRO-2 and ZeRO-3, world 1, tiny random Qwen2): only
adapters train and are checkpointed; weights leave the engine merged, in HF naming."""

from __future__ import annotations

import os

import pytest
import torch

from rlpost.config.schema import LoraConfig, ModelConfig
from test_deepspeed_engine import trainer_cfg  # same schedule and clip as the equivalence test
from test_fsdp_engine import (  # same batch, loss and model
    MICRO, _full_weights, _run_world, make_batch, model_dir, token_mean_loss,
)

pytestmark = pytest.mark.integration
__all__ = ["model_dir"]
RANK, ALPHA = 4, 8.0
TARGETS = ["q_proj", "up_proj"]


def _engine(model_dir, stage, seed=0):
    from rlpost.engines.deepspeed import DeepSpeedEngine

    model_cfg = ModelConfig(path=model_dir, lora=LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS))
    return DeepSpeedEngine(model_dir, model_cfg, trainer_cfg(f"zero{stage}"), seed=seed)


def _adapters(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.model.named_parameters() if p.requires_grad}


def _worker(rank, world, model_dir, out_dir):
    os.environ["LOCAL_RANK"] = "0"
    batch = make_batch()
    res = {}
    for stage in (2, 3):
        engine = _engine(model_dir, stage)
        r = {"trainable": [n for n, p in engine.model.named_parameters() if p.requires_grad],
             "weights0": _full_weights(engine)}
        r["step1"] = engine.train_step(batch, token_mean_loss, MICRO)
        r["weights1"], r["adapters1"] = _full_weights(engine), _adapters(engine)
        engine.save(os.path.join(out_dir, f"ckpt{stage}"))
        r["saved_keys"] = list(torch.load(os.path.join(out_dir, f"ckpt{stage}", "model.pt")).keys())
        r["step2"] = engine.train_step(batch, token_mean_loss, MICRO)
        r["weights2"] = _full_weights(engine)
        engine.export_hf(os.path.join(out_dir, f"export{stage}"))
        del engine
        loaded = _engine(model_dir, stage, seed=123)
        loaded.load(os.path.join(out_dir, f"ckpt{stage}"))
        r["loaded_step2"] = loaded.train_step(batch, token_mean_loss, MICRO)
        r["loaded_weights2"] = _full_weights(loaded)
        del loaded
        res[stage] = r
    torch.save(res, os.path.join(out_dir, "lora.pt"))


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("lora"))
    _run_world(1, _worker, model_dir, out_dir)
    res = torch.load(os.path.join(out_dir, "lora.pt"), weights_only=False)
    res["out_dir"] = out_dir
    return res


@pytest.mark.parametrize("stage", [2, 3])
def test_only_adapters_train_and_weights_leave_merged(runs, model_dir, stage):
    from transformers import AutoModelForCausalLM

    r = runs[stage]
    # 2 layers x 2 target modules x (A, B)
    assert len(r["trainable"]) == 8 and all(".lora_A." in n or ".lora_B." in n for n in r["trainable"])
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    assert list(r["weights0"]) == list(plain)  # HF names, no peft prefixes
    for name in plain:  # B starts at 0: merged == base
        torch.testing.assert_close(r["weights0"][name], plain[name], atol=0, rtol=0)
    assert r["step1"]["skipped"] == 0.0 and r["step1"]["grad_norm"] > 0
    # Untargeted tensors never move; targeted ones move by exactly (alpha / r) * B @ A.
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(r["weights2"][name], plain[name], atol=0, rtol=0)
    prefix = "base_model.model.model.layers.1.mlp.up_proj"
    a, b = r["adapters1"][f"{prefix}.lora_A.default.weight"], r["adapters1"][f"{prefix}.lora_B.default.weight"]
    assert b.abs().max() > 0
    expected = plain["model.layers.1.mlp.up_proj.weight"] + (ALPHA / RANK) * b @ a
    torch.testing.assert_close(r["weights1"]["model.layers.1.mlp.up_proj.weight"], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_holds_adapters_only_and_resumes(runs, stage):
    r = runs[stage]
    assert sorted(r["saved_keys"]) == sorted(r["trainable"])
    assert r["loaded_step2"]["loss"] == pytest.approx(r["step2"]["loss"], rel=1e-5)
    assert r["loaded_step2"]["lr"] == pytest.approx(r["step2"]["lr"])
    for name, value in r["weights2"].items():
        torch.testing.assert_close(r["loaded_weights2"][name], value, atol=1e-5, rtol=0)


def test_export_is_a_plain_merged_hf_model(runs):
    from transformers import AutoModelForCausalLM

    for stage in (2, 3):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(runs["out_dir"], f"export{stage}"))
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, runs[stage]["weights2"][name], atol=0, rtol=0)
