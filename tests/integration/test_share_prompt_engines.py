"""Training engines with trainer.share_prompt on a tiny random Qwen2, CPU/gloo: FSDP2 at
world 1 (this process) and world 2 (spawned), DeepSpeed ZeRO-2 and ZeRO-3 at world 1.
Old log-probs, the training forward's log-probs, the gradient norm and the updated
weights equal the plain padded forward's. The model runs twice (prefix, then the rest)
per micro-batch; world 2 checks that FSDP2 still reduces each gradient once, ZeRO-3
that its parameter gathering follows both forwards."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from rlpost.config.schema import ModelConfig, TrainerConfig
from tests.integration.test_fsdp_engine import _full_weights, _run_world, _sum_over_ranks, token_mean_loss
from tests.integration.test_fsdp_engine import model_dir  # noqa: F401  (fixture)
from tests.unit.test_share_prompt import grpo_like_batch

pytestmark = pytest.mark.integration


def _worker(rank, world, model_dir, out_dir, backend):  # noqa: F811
    from rlpost.engines.deepspeed import DeepSpeedEngine
    from rlpost.engines.fsdp import FSDPEngine

    res = {}
    # 8 rows: 4 per rank at world 2; micro-batches of 3 split a prompt's completions.
    shard = grpo_like_batch(64, seed=3).shard(world)[rank]
    for share in (False, True):
        cfg = TrainerConfig(lr=1e-2, grad_clip=1e9, micro_batch_size=3, share_prompt=share,
                            backend="fsdp2" if backend == "fsdp2" else "deepspeed", zero_stage=3 if backend == "zero3" else 2)
        engine = (FSDPEngine if backend == "fsdp2" else DeepSpeedEngine)(model_dir, ModelConfig(path=model_dir), cfg, seed=0, logit_temperature=0.7)
        old = engine.forward_logprobs(shard, with_entropy=True)
        metrics, train_lp = engine.train_step(shard, token_mean_loss, 3, return_logprobs=True)
        gathered = []
        for t in (old.logprobs, old.entropy, train_lp):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t)
            gathered.append(torch.cat(parts))
        res[share] = {"old": gathered[0], "entropy": gathered[1], "train": gathered[2],
                      "metrics": _sum_over_ranks(metrics), "weights": _full_weights(engine)}
    if rank == 0:
        torch.save(res, os.path.join(out_dir, f"w{world}.pt"))


@pytest.mark.parametrize("backend,world", [("fsdp2", 1), ("fsdp2", 2), ("zero2", 1), ("zero3", 1)])
def test_share_prompt_train_step_equals_plain(model_dir, tmp_path, backend, world):  # noqa: F811
    _run_world(world, _worker, model_dir, str(tmp_path), backend)
    res = torch.load(os.path.join(tmp_path, f"w{world}.pt"), weights_only=False)
    plain, shared = res[False], res[True]
    for key in ("old", "entropy", "train"):
        torch.testing.assert_close(shared[key], plain[key], atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    assert shared["metrics"]["loss"] == pytest.approx(plain["metrics"]["loss"], rel=1e-5, abs=1e-7)
    assert shared["metrics"]["grad_norm"] == pytest.approx(plain["metrics"]["grad_norm"], rel=1e-5)
    # Adam moves each weight by about lr * g / (|g| + eps): a gradient element near 0
    # whose float32 rounding differs (another summation order) moves differently, seen
    # at 3e-5 on one of 1024 elements. 1e-4 is 1% of one step's move (lr = 1e-2); the
    # gradients themselves are compared to 1e-5 in tests/unit/test_share_prompt.py.
    for name, w in plain["weights"].items():
        torch.testing.assert_close(shared["weights"][name], w, atol=1e-4, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
