"""DeepSpeedEngine (ZeRO-2, ZeRO-3) against FSDPEngine and plain torch on a tiny random
Qwen2, CPU/gloo, world sizes 1 and 2, same batch and seed.

Two runs (world 1 in this process, world 2 in two spawned ones). In each, every
backend takes the same two steps from the same weights, saves after the first,
then takes a NaN step. Checkpoints then cross backends and world sizes: world 1's
ZeRO-3 engine loads world 1's FSDP checkpoint, world 2's ZeRO-3 engine loads world 1's
ZeRO-2 checkpoint, and each takes step 2, which must match the saver's step 2.
World 1 also runs ZeRO-3 with optimizer and parameter offload, and FSDP2 and ZeRO-2 with a token budget, packing and chunked
log-softmax, which must match their fixed-size padded runs.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from rlpost.config.schema import ModelConfig, TrainerConfig
from rlpost.errors import ModelError
from test_fsdp_engine import (  # same batch, loss, model and reference step
    ADAM_ATOL, GRAD_CLIP, LAYERS, LR, MICRO, _assert_weights_close, _full_weights, _run_world, _sum_over_ranks,
    make_batch, model_dir, nan_loss, reference, token_mean_loss,
)

pytestmark = pytest.mark.integration
__all__ = ["model_dir", "reference"]  # fixtures, imported for pytest
BACKENDS = ("fsdp2", "zero2", "zero3")


def trainer_cfg(backend: str, **kw) -> TrainerConfig:
    stage = {"zero2": 2, "zero3": 3}.get(backend, 2)
    return TrainerConfig(backend="fsdp2" if backend == "fsdp2" else "deepspeed", zero_stage=stage, lr=LR,
                         grad_clip=GRAD_CLIP, warmup_steps=2, lr_schedule="cosine", total_steps=4,
                         micro_batch_size=MICRO, **kw)


def make_engine(backend: str, model_dir: str, seed: int = 0, **kw):
    from rlpost.engines.deepspeed import DeepSpeedEngine
    from rlpost.engines.fsdp import FSDPEngine

    cls = FSDPEngine if backend == "fsdp2" else DeepSpeedEngine
    return cls(model_dir, ModelConfig(path=model_dir), trainer_cfg(backend, **kw), seed=seed)


def _gather_rows(t: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def _run_backend(engine, shard, world, ckpt) -> dict:
    res = {"logprobs": _gather_rows(engine.forward_logprobs(shard).logprobs, world),
           "weights0": _full_weights(engine)}
    step1, train_logprobs = engine.train_step(shard, token_mean_loss, MICRO, return_logprobs=True)
    res["step1"] = _sum_over_ranks(step1)
    res["train_logprobs"] = _gather_rows(train_logprobs, world)
    res["weights1"] = _full_weights(engine)
    if ckpt:
        engine.save(ckpt)
    res["step2"] = _sum_over_ranks(engine.train_step(shard, token_mean_loss, MICRO))
    res["weights2"] = _full_weights(engine)
    return res


def _load_and_step(backend, model_dir, ckpt, shard) -> dict:
    engine = make_engine(backend, model_dir, seed=123)
    engine.load(ckpt)
    res = {"weights1": _full_weights(engine)}
    res["step2"] = _sum_over_ranks(engine.train_step(shard, token_mean_loss, MICRO))
    res["weights2"] = _full_weights(engine)
    return res


def _worker(rank, world, model_dir, out_dir, name):
    os.environ["LOCAL_RANK"] = "0"
    shard = make_batch().shard(world)[rank]
    res = {}
    for backend in BACKENDS:
        engine = make_engine(backend, model_dir)
        res[backend] = _run_backend(engine, shard, world, os.path.join(out_dir, f"ckpt_{name}_{backend}"))
        if backend == "zero3":
            run = res[backend]
            run["nan_step"] = engine.train_step(shard, nan_loss, MICRO)
            run["weights_after_nan"] = _full_weights(engine)
            run["step_after_nan"] = _sum_over_ranks(engine.train_step(shard, token_mean_loss, MICRO))
            engine.export_hf(os.path.join(out_dir, f"export_{name}"))
            run["weights_exported"] = _full_weights(engine)
            try:  # rank 0 alone finds the folder empty; every rank must raise, none hang
                engine.load(os.path.join(out_dir, "no_such_checkpoint"))
                raised = 0
            except ModelError:
                raised = 1
            flags = torch.tensor([raised])
            dist.all_reduce(flags)
            run["missing_ckpt_raised_on"] = int(flags.item())
        del engine
    if world == 1:
        for backend in ("fsdp2", "zero2"):
            res[f"{backend}_budget_packed"] = _run_backend(
                make_engine(backend, model_dir, max_tokens_per_microbatch=20, packing=True, logprob_chunk_tokens=16),
                shard, world, None)
        res["zero3_offload"] = _run_backend(
            make_engine("zero3", model_dir, offload_optimizer=True, offload_params=True), shard, world, None)
        res["zero3_from_fsdp2"] = _load_and_step("zero3", model_dir, os.path.join(out_dir, "ckpt_w1_fsdp2"), shard)
    else:
        res["zero3_from_w1_zero2"] = _load_and_step("zero3", model_dir, os.path.join(out_dir, "ckpt_w1_zero2"), shard)
    if rank == 0:
        torch.save(res, os.path.join(out_dir, f"{name}.pt"))


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict[str, dict]:
    out_dir = str(tmp_path_factory.mktemp("ds_runs"))
    _run_world(1, _worker, model_dir, out_dir, "w1")
    _run_world(2, _worker, model_dir, out_dir, "w2", timeout_s=600)
    res = {name: torch.load(os.path.join(out_dir, f"{name}.pt"), weights_only=False) for name in ("w1", "w2")}
    res["out_dir"] = out_dir
    return res


def test_train_step_returns_its_forwards_logprobs_in_row_order(runs):
    """The on-policy path's "old" log-probs: the training forward's, detached, back in
    the shard's row order even when a token budget sorted the rows longest first."""
    for world in ("w1", "w2"):
        for name, run in runs[world].items():
            if "train_logprobs" in run:
                torch.testing.assert_close(run["train_logprobs"], run["logprobs"], atol=1e-5, rtol=0,
                                           msg=lambda m, world=world, name=name: f"{world} {name}: {m}")
    assert "train_logprobs" in runs["w1"]["fsdp2_budget_packed"]


@pytest.mark.parametrize("world", ["w1", "w2"])
@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_deepspeed_matches_fsdp_and_plain_torch(runs, reference, world, backend):
    fsdp, ds = runs[world]["fsdp2"], runs[world][backend]
    torch.testing.assert_close(ds["logprobs"], reference["logprobs"], atol=1e-5, rtol=0)
    _assert_weights_close(ds["weights0"], fsdp["weights0"], atol=0)
    step = ds["step1"]
    assert step["skipped"] == 0.0 and step["lr"] == pytest.approx(LR * 0.5)
    assert step["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    # Summed over ranks, not averaged: an average would halve w2's norm.
    assert step["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert step["grad_norm"] > GRAD_CLIP  # clipping is exercised
    _assert_weights_close(ds["weights1"], reference["weights1"], atol=ADAM_ATOL)
    assert ds["step2"]["lr"] == pytest.approx(LR)
    assert ds["step2"]["loss"] == pytest.approx(fsdp["step2"]["loss"], rel=1e-5)
    assert ds["step2"]["grad_norm"] == pytest.approx(fsdp["step2"]["grad_norm"], rel=1e-5)
    _assert_weights_close(ds["weights2"], fsdp["weights2"], atol=ADAM_ATOL)
    for name in LAYERS:
        assert not torch.equal(ds["weights0"][name], ds["weights2"][name])


@pytest.mark.parametrize("backend", ["fsdp2", "zero2"])
def test_token_budget_and_packing_match_fixed_micro_batches(runs, reference, backend):
    # Budget 20 packed tokens: micro-batches [12], [12], [11], [10, 9], [7, 5, 3]
    # instead of 3 rows each; log-softmax in chunks of 16 tokens.
    fixed, packed = runs["w1"][backend], runs["w1"][f"{backend}_budget_packed"]
    torch.testing.assert_close(packed["logprobs"], reference["logprobs"], atol=1e-5, rtol=0)
    for key in ("step1", "step2"):
        assert packed[key]["loss"] == pytest.approx(fixed[key]["loss"], rel=1e-5)
        assert packed[key]["grad_norm"] == pytest.approx(fixed[key]["grad_norm"], rel=1e-5)
    _assert_weights_close(packed["weights2"], fixed["weights2"], atol=ADAM_ATOL)


def test_zero3_with_optimizer_and_parameter_offload_matches_fsdp(runs):
    fsdp, ds = runs["w1"]["fsdp2"], runs["w1"]["zero3_offload"]
    for key in ("step1", "step2"):
        assert ds[key]["loss"] == pytest.approx(fsdp[key]["loss"], rel=1e-5)
        assert ds[key]["grad_norm"] == pytest.approx(fsdp[key]["grad_norm"], rel=1e-5)
    _assert_weights_close(ds["weights2"], fsdp["weights2"], atol=ADAM_ATOL)


@pytest.mark.parametrize("saver, loader", [("fsdp2", "zero3_from_fsdp2"), ("zero2", "zero3_from_w1_zero2")])
def test_checkpoint_loads_across_backends_and_world_sizes(runs, saver, loader):
    src = runs["w1"][saver]
    dst = runs["w1"].get(loader) or runs["w2"][loader]
    _assert_weights_close(dst["weights1"], src["weights1"], atol=0)
    # The next step is the saver's: same lr (schedule restored), loss, norm, weights
    # (AdamW moments restored: with fresh moments step 2 would move weights differently).
    assert dst["step2"]["lr"] == pytest.approx(src["step2"]["lr"])
    assert dst["step2"]["loss"] == pytest.approx(src["step2"]["loss"], rel=1e-5)
    assert dst["step2"]["grad_norm"] == pytest.approx(src["step2"]["grad_norm"], rel=1e-5)
    _assert_weights_close(dst["weights2"], src["weights2"], atol=ADAM_ATOL)


@pytest.mark.parametrize("world", ["w1", "w2"])
def test_nan_loss_skips_the_update_on_every_rank(runs, world):
    run = runs[world]["zero3"]
    assert run["nan_step"]["skipped"] == 1.0
    assert not math.isfinite(run["nan_step"]["grad_norm"])
    _assert_weights_close(run["weights_after_nan"], run["weights2"], atol=0)
    # The schedule did not advance: the next step is optimizer step 2, cosine factor 1.0.
    assert run["step_after_nan"]["skipped"] == 0.0
    assert run["step_after_nan"]["lr"] == pytest.approx(LR)
    assert run["missing_ckpt_raised_on"] == (1 if world == "w1" else 2)


def test_export_hf_loads_with_transformers(runs):
    from transformers import AutoModelForCausalLM

    for name in ("w1", "w2"):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(runs["out_dir"], f"export_{name}"))
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        _assert_weights_close(model.state_dict(), runs[name]["zero3"]["weights_exported"], atol=0)
