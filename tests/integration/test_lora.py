"""LoRA in both trainer backends (DeepSpeed ZeRO-2 and ZeRO-3 at world 1, FSDP2 at
world 2; tiny random Qwen2): only adapters train and are checkpointed; weights leave
the engine merged, in HF naming; the backends take the same step."""

from __future__ import annotations

import os

import pytest
import torch

from rlpost.config.schema import LoraConfig, ModelConfig
from test_deepspeed_engine import trainer_cfg  # same schedule and clip as the equivalence test
from test_fsdp_engine import (  # same batch, loss and model
    MICRO, _full_weights, _run_world, _sum_over_ranks, make_batch, model_dir, token_mean_loss,
)

pytestmark = pytest.mark.integration
__all__ = ["model_dir"]
RANK, ALPHA = 4, 8.0
TARGETS = ["q_proj", "up_proj"]


VARIANTS = ["zero2", "zero3", "fsdp2"]


def _engine(model_dir, variant, seed=0):
    from rlpost.engines import make_train_engine

    model_cfg = ModelConfig(path=model_dir, lora=LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS))
    cfg = trainer_cfg(variant)
    return make_train_engine(cfg.backend, model_dir, model_cfg, cfg, seed=seed)


def _adapters(engine) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    if engine.trainer_cfg.backend == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.model.named_parameters() if p.requires_grad}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in engine.model.named_parameters() if p.requires_grad}


def _worker(rank, world, model_dir, out_dir, variants):
    os.environ["LOCAL_RANK"] = str(rank) if world > 1 else "0"
    batch = make_batch().shard(world)[rank]  # world 2: each rank half the rows
    res = {}
    for stage in variants:
        engine = _engine(model_dir, stage)
        r = {"trainable": [n for n, p in engine.model.named_parameters() if p.requires_grad],
             "weights0": _full_weights(engine)}
        r["step1"] = _sum_over_ranks(engine.train_step(batch, token_mean_loss, MICRO))
        r["weights1"], r["adapters1"] = _full_weights(engine), _adapters(engine)
        engine.save(os.path.join(out_dir, f"ckpt{stage}"))
        r["saved_keys"] = list(torch.load(os.path.join(out_dir, f"ckpt{stage}", "model.pt")).keys())
        r["step2"] = _sum_over_ranks(engine.train_step(batch, token_mean_loss, MICRO))
        r["weights2"] = _full_weights(engine)
        engine.export_hf(os.path.join(out_dir, f"export{stage}"))
        del engine
        loaded = _engine(model_dir, stage, seed=123)
        loaded.load(os.path.join(out_dir, f"ckpt{stage}"))
        r["loaded_step2"] = _sum_over_ranks(loaded.train_step(batch, token_mean_loss, MICRO))
        r["loaded_weights2"] = _full_weights(loaded)
        del loaded
        res[stage] = r
    if rank == 0:
        torch.save(res, os.path.join(out_dir, f"lora_{'_'.join(variants)}.pt"))


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("lora"))
    res = {}
    for world, variants in ((1, ["zero2", "zero3"]), (2, ["fsdp2"])):
        _run_world(world, _worker, model_dir, out_dir, variants, timeout_s=300.0)
        res.update(torch.load(os.path.join(out_dir, f"lora_{'_'.join(variants)}.pt"), weights_only=False))
    res["out_dir"] = out_dir
    return res


@pytest.mark.parametrize("stage", VARIANTS)
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


@pytest.mark.parametrize("stage", VARIANTS)
def test_checkpoint_holds_adapters_only_and_resumes(runs, stage):
    r = runs[stage]
    assert sorted(r["saved_keys"]) == sorted(r["trainable"])
    assert r["loaded_step2"]["loss"] == pytest.approx(r["step2"]["loss"], rel=1e-5)
    assert r["loaded_step2"]["lr"] == pytest.approx(r["step2"]["lr"])
    for name, value in r["weights2"].items():
        torch.testing.assert_close(r["loaded_weights2"][name], value, atol=1e-5, rtol=0)


def test_export_is_a_plain_merged_hf_model(runs):
    from transformers import AutoModelForCausalLM

    for stage in VARIANTS:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(runs["out_dir"], f"export{stage}"))
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, runs[stage]["weights2"][name], atol=0, rtol=0)


def test_fsdp2_and_deepspeed_take_the_same_lora_step(runs):
    """Same seed, same adapter init, same batch: the merged weights after a step agree,
    though FSDP2 ran two ranks on halves of the batch and DeepSpeed one."""
    for name, value in runs["zero2"]["weights1"].items():
        torch.testing.assert_close(runs["fsdp2"]["weights1"][name], value, atol=1e-5, rtol=1e-5)
    assert runs["fsdp2"]["step1"]["grad_norm"] == pytest.approx(runs["zero2"]["step1"]["grad_norm"], rel=1e-4)
