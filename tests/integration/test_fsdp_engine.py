"""FSDPEngine on a tiny random Qwen2, on CPU/gloo, at world sizes 1 and 2.

Three runs (module fixture; world 1 in this process, world 2 in two spawned ones),
then plain-torch references here:
  run "w1":      world 1: logprobs, two train steps (saving in between), export.
  run "w2":      world 2, gradient checkpointing on: the same, plus a NaN step;
                 then a fresh engine loads w1's checkpoint and takes step 2.
  run "w1_load": world 1: a fresh engine loads w2's checkpoint and takes step 2.
"""

from __future__ import annotations

import copy
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlpost.config.schema import ModelConfig, TrainerConfig
from rlpost.errors import ModelError
from rlpost.types import ModelOutput, TrainBatch

pytestmark = pytest.mark.integration

LR = 1e-2
GRAD_CLIP = 0.05  # below the first step's grad norm, so clipping is exercised
MICRO = 3  # does not divide the 4 rows per rank nor the 8 rows of world 1
# Adam moves each weight by about lr * g / (|g| + eps): for the few gradients near
# eps, float32 summation order (micro-batches, ranks) shows up at ~1e-6. 1e-5 is 0.1%
# of one step's move (lr = 1e-2), far below any real sharding or reduction error.
ADAM_ATOL = 1e-5
LAYERS = ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight")


def trainer_cfg() -> TrainerConfig:
    # warmup 2 of 4 steps: lr factors 0.5, 1.0, then cosine from 1.0 (see lr_factor).
    return TrainerConfig(lr=LR, grad_clip=GRAD_CLIP, warmup_steps=2, lr_schedule="cosine", total_steps=4,
                         micro_batch_size=MICRO)


def make_batch() -> TrainBatch:
    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor([12, 9, 5, 12, 7, 10, 3, 11])
    B, T = len(lengths), int(lengths.max())
    input_ids = torch.randint(1, 64, (B, T), generator=g)
    attention_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask  # pad id 0, right padding
    loss_mask = attention_mask.float()
    loss_mask[:, :2] = 0  # a two-token "prompt"
    advantages = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    return TrainBatch(input_ids, attention_mask, loss_mask, advantages=advantages,
                      global_num_tokens=float(loss_mask.sum()))


def token_mean_loss(out: ModelOutput, mb: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """-A * logp averaged over every trained token of the step (LossFn contract)."""
    loss = -(out.logprobs * mb.advantages * mb.loss_mask).sum() / mb.global_num_tokens
    entropy = (out.entropy * mb.loss_mask).sum() / mb.global_num_tokens
    return loss, {"loss": loss.item(), "entropy": entropy.item()}


def nan_loss(out: ModelOutput, mb: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
    loss, metrics = token_mean_loss(out, mb)
    return loss * float("nan"), metrics


def nan_grad_loss(out: ModelOutput, mb: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """A finite loss (sqrt(|0|) adds 0) whose gradient is NaN (d sqrt at 0 is inf, times 0)."""
    loss, metrics = token_mean_loss(out, mb)
    return loss + (out.logprobs * 0.0).abs().sqrt().sum(), metrics


# ---------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_group(rank: int, world: int, port: int, fn, *args):
    """Run ``fn(rank, world, *args)`` as one rank of a default gloo group bound to
    loopback only, and always tear the group down."""
    from rlpost.distributed import destroy_default_group, init_default_group

    torch.set_num_threads(1)
    try:
        init_default_group("127.0.0.1", port, rank, world, timeout_s=60, backend="gloo")
        return fn(rank, world, *args)
    finally:
        destroy_default_group()


def _spawned_rank(rank: int, world: int, port: int, fn, *args) -> None:
    """``_in_group`` in a spawned process whose exit code is the work's: 0 once ``fn``
    returned and the group is down, 1 on an exception. It leaves with ``os._exit`` so
    that no library's C++ thread destroyed at interpreter shutdown can turn finished
    work into SIGABRT ("terminate called without an active exception", seen once with
    DeepSpeed at world 2 after every collective had completed)."""
    import sys
    import traceback

    code = 0
    try:
        _in_group(rank, world, port, fn, *args)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_world(world: int, fn, *args, timeout_s: float = 120.0) -> None:
    """World 1 runs in this process (no spawn: imports cost ~8 s a process on 2
    cores); larger worlds in spawned processes that are always reaped."""
    port = _free_port()
    if world == 1:
        _in_group(0, 1, port, fn, *args)
        return
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spawned_rank, args=(rank, world, port, fn, *args), daemon=True)
             for rank in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout_s)
        codes = [p.exitcode for p in procs]
        assert codes == [0] * world, f"{fn.__name__} ranks exited with {codes} (see captured stderr)"
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)


def _sum_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Additive metrics summed over ranks; global ones (identical everywhere) kept."""
    out = dict(metrics)
    for key in ("loss", "entropy"):
        t = torch.tensor([metrics[key]], dtype=torch.float64)
        dist.all_reduce(t)
        out[key] = t.item()
    return out


def _full_weights(engine) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in engine.named_full_weights()}


def _full_vs_full_tensor(engine) -> tuple[bool, bool]:
    """Whether ``_full`` (what ``named_full_weights`` gathers with) equals DTensor's
    ``full_tensor()`` bit for bit on every parameter, and whether it returned the
    local shard's own storage for all of them (collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    from rlpost.engines.fsdp import _full

    equal = shared = True
    for t in engine.model.state_dict().values():
        if isinstance(t, DTensor):
            full, reference = _full(t), t.full_tensor()
            equal &= full.shape == reference.shape and torch.equal(full, reference)
            shared &= full.data_ptr() == t.to_local().data_ptr()
    return equal, shared


def _full_optimizer_state(engine) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    _, optim = get_state_dict(engine.model, engine.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return copy.deepcopy(optim)  # scalar "step" tensors are the live ones


def _worker_train(rank, world, model_dir, out_dir, name, checkpointing, load_from):
    from rlpost.engines.fsdp import FSDPEngine

    res = {}
    model_cfg = ModelConfig(path=model_dir, gradient_checkpointing=checkpointing)
    engine = FSDPEngine(model_dir, model_cfg, trainer_cfg(), seed=0)
    shard = make_batch().shard(world)[rank]

    out = engine.forward_logprobs(shard, with_entropy=True)
    parts = [torch.empty_like(out.logprobs) for _ in range(world)]
    dist.all_gather(parts, out.logprobs)
    res["logprobs"] = torch.cat(parts)
    res["weights0"] = _full_weights(engine)
    res["full"] = _full_vs_full_tensor(engine)
    step1, train_logprobs = engine.train_step(shard, token_mean_loss, MICRO, return_logprobs=True)
    res["step1"] = _sum_over_ranks(step1)
    parts = [torch.empty_like(train_logprobs) for _ in range(world)]
    dist.all_gather(parts, train_logprobs)
    res["train_logprobs"] = torch.cat(parts)
    res["weights1"] = _full_weights(engine)
    engine.save(os.path.join(out_dir, f"ckpt_{name}"))
    res["optim1"] = _full_optimizer_state(engine)
    res["step2"] = _sum_over_ranks(engine.train_step(shard, token_mean_loss, MICRO))
    res["weights2"] = _full_weights(engine)
    res["nan_step"] = engine.train_step(shard, nan_loss, MICRO)
    res["weights_after_nan"] = _full_weights(engine)
    res["nan_grad_step"] = engine.train_step(shard, nan_grad_loss, MICRO)
    res["weights_after_nan_grad"] = _full_weights(engine)
    res["step_after_nan"] = _sum_over_ranks(engine.train_step(shard, token_mean_loss, MICRO))
    res["weights3"] = _full_weights(engine)
    engine.export_hf(os.path.join(out_dir, f"export_{name}"))
    try:  # rank 0 alone finds the folder empty; every rank must raise, none hang
        engine.load(os.path.join(out_dir, "no_such_checkpoint"))
        raised = 0
    except ModelError:
        raised = 1
    flags = torch.tensor([raised])
    dist.all_reduce(flags)
    res["missing_ckpt_raised_on"] = int(flags.item())
    if load_from:
        res["loaded"] = _load_and_step(model_dir, os.path.join(out_dir, load_from), shard)
    if rank == 0:
        torch.save(res, os.path.join(out_dir, f"{name}.pt"))


def _load_and_step(model_dir, ckpt, shard) -> dict:
    from rlpost.engines.fsdp import FSDPEngine

    engine = FSDPEngine(model_dir, ModelConfig(path=model_dir), trainer_cfg(), seed=123)
    engine.load(ckpt)
    res = {"weights1": _full_weights(engine), "optim1": _full_optimizer_state(engine)}
    res["step2"] = _sum_over_ranks(engine.train_step(shard, token_mean_loss, MICRO))
    res["weights2"] = _full_weights(engine)
    return res


def _worker_load(rank, world, model_dir, out_dir, name, ckpt):
    res = _load_and_step(model_dir, os.path.join(out_dir, ckpt), make_batch().shard(world)[rank])
    if rank == 0:
        torch.save(res, os.path.join(out_dir, f"{name}.pt"))


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict[str, dict]:
    out_dir = str(tmp_path_factory.mktemp("runs"))
    _run_world(1, _worker_train, model_dir, out_dir, "w1", False, None)
    _run_world(2, _worker_train, model_dir, out_dir, "w2", True, "ckpt_w1")
    _run_world(1, _worker_load, model_dir, out_dir, "w1_load", "ckpt_w2")
    res = {name: torch.load(os.path.join(out_dir, f"{name}.pt"), weights_only=False)
           for name in ("w1", "w2", "w1_load")}
    res["out_dir"] = out_dir
    return res


@pytest.fixture(scope="module")
def reference(model_dir) -> dict:
    """One step in plain torch: HF model, full batch, clip, AdamW, no FSDP."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = make_batch()
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    logprobs = torch.cat([torch.zeros(batch.size, 1), logp * batch.attention_mask[:, 1:]], dim=1)
    p = torch.softmax(logits.float(), -1)[:, :-1]
    entropy = torch.cat([torch.zeros(batch.size, 1), -(p * p.log()).sum(-1) * batch.attention_mask[:, 1:]], dim=1)
    loss, _ = token_mean_loss(ModelOutput(logprobs, entropy), batch)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP).item()
    # First warmup step: lr factor 0.5; TrainerConfig defaults: no weight decay, betas (0.9, 0.999).
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR * 0.5, betas=(0.9, 0.999), weight_decay=0.0)
    optimizer.step()
    return {"logprobs": logprobs.detach(), "loss": loss.item(), "grad_norm": grad_norm,
            "entropy": ((entropy * batch.loss_mask).sum() / batch.global_num_tokens).item(),
            "weights1": {k: v.clone() for k, v in model.state_dict().items()}}


def _assert_weights_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------- tests
def test_logprobs_match_plain_hf_forward(runs, reference):
    batch = make_batch()
    for name in ("w1", "w2"):
        lp = runs[name]["logprobs"]
        torch.testing.assert_close(lp, reference["logprobs"], atol=1e-5, rtol=0)
        assert (lp[:, 0] == 0).all() and (lp[batch.attention_mask == 0] == 0).all()


def test_train_step_returns_its_forwards_logprobs(runs, reference):
    """return_logprobs: the training forward's log-probs (train mode, gradient
    checkpointing in w2), detached, equal to a no-grad forward before the update."""
    for name in ("w1", "w2"):
        torch.testing.assert_close(runs[name]["train_logprobs"], reference["logprobs"], atol=1e-5, rtol=0)
        assert not runs[name]["train_logprobs"].requires_grad


def test_two_ranks_match_one_rank_and_plain_torch(runs, reference):
    w1, w2 = runs["w1"], runs["w2"]
    for run in (w1, w2):
        step = run["step1"]
        assert step["skipped"] == 0.0
        assert step["lr"] == pytest.approx(LR * 0.5)
        assert step["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        assert step["entropy"] == pytest.approx(reference["entropy"], rel=1e-6)
        # Summed, not averaged, over ranks: an average would halve w2's norm.
        assert step["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
        assert step["grad_norm"] > GRAD_CLIP
        _assert_weights_close(run["weights1"], reference["weights1"], atol=ADAM_ATOL)
    assert w1["step2"]["lr"] == pytest.approx(LR) and w2["step2"]["lr"] == pytest.approx(LR)
    assert w2["step2"]["loss"] == pytest.approx(w1["step2"]["loss"], rel=1e-5)
    assert w2["step2"]["grad_norm"] == pytest.approx(w1["step2"]["grad_norm"], rel=1e-5)
    _assert_weights_close(w2["weights2"], w1["weights2"], atol=ADAM_ATOL)
    for name in LAYERS:  # the steps moved the weights
        assert not torch.equal(w1["weights0"][name], w1["weights2"][name])


def test_one_rank_takes_the_local_shard_and_two_ranks_gather(runs):
    # One rank: the shard itself, zero-copy (the storage full_tensor() hands back too;
    # _full only skips its redistribute dispatch, a speed matter measured in
    # scripts/bench_weight_sync.py --sender fsdp).
    assert runs["w1"]["full"] == (True, True)
    # Two ranks: a gathered copy, equal to full_tensor().
    assert runs["w2"]["full"] == (True, False)


def test_named_full_weights_follow_hf_state_dict(runs, model_dir):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    weights = runs["w2"]["weights0"]
    assert list(weights) == list(plain)
    assert "lm_head.weight" in weights
    _assert_weights_close(weights, plain, atol=0)
    assert torch.equal(runs["w2"]["weights2"]["lm_head.weight"], runs["w2"]["weights2"]["model.embed_tokens.weight"])


@pytest.mark.parametrize("saved, loaded", [("w2", "w1_load"), ("w1", "w2")])
def test_checkpoint_loads_across_world_sizes(runs, saved, loaded):
    src = runs[saved]
    dst = runs[loaded] if loaded == "w1_load" else runs[loaded]["loaded"]
    _assert_weights_close(dst["weights1"], src["weights1"], atol=0)
    a, b = src["optim1"], dst["optim1"]
    assert a["state"].keys() == b["state"].keys()
    for fqn in a["state"]:
        for key, value in a["state"][fqn].items():
            torch.testing.assert_close(b["state"][fqn][key], value, atol=0, rtol=0)
    # A checkpoint round trip turns the betas tuple into a list; AdamW takes either.
    def groups(osd):
        return [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in osd["param_groups"]]

    assert groups(a) == groups(b)
    # The next step is the one the saving run took: same lr (scheduler restored),
    # loss, norm and weights.
    assert dst["step2"]["lr"] == pytest.approx(src["step2"]["lr"])
    assert dst["step2"]["loss"] == pytest.approx(src["step2"]["loss"], rel=1e-5)
    assert dst["step2"]["grad_norm"] == pytest.approx(src["step2"]["grad_norm"], rel=1e-5)
    _assert_weights_close(dst["weights2"], src["weights2"], atol=ADAM_ATOL)


def test_missing_checkpoint_raises_on_every_rank(runs):
    assert runs["w1"]["missing_ckpt_raised_on"] == 1
    assert runs["w2"]["missing_ckpt_raised_on"] == 2


def test_nan_loss_or_gradient_skips_the_update(runs):
    for name in ("w1", "w2"):
        run = runs[name]
        assert run["nan_step"]["skipped"] == 1.0
        assert not math.isfinite(run["nan_step"]["grad_norm"])
        _assert_weights_close(run["weights_after_nan"], run["weights2"], atol=0)
        # A finite loss with a NaN gradient is caught by the gradient norm instead.
        assert run["nan_grad_step"]["skipped"] == 1.0 and math.isfinite(run["nan_grad_step"]["loss"])
        assert not math.isfinite(run["nan_grad_step"]["grad_norm"])
        _assert_weights_close(run["weights_after_nan_grad"], run["weights2"], atol=0)
        # The schedule did not advance either: the next step is optimizer step 2 (0-based),
        # cosine progress 0 -> factor 1.0; had it advanced, progress 1/2 -> factor 0.5.
        assert run["step_after_nan"]["skipped"] == 0.0
        assert run["step_after_nan"]["lr"] == pytest.approx(LR)


def test_export_hf_loads_with_transformers(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("w1", "w2"):
        path = os.path.join(runs["out_dir"], f"export_{name}")
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("t5") == 5
        _assert_weights_close(model.state_dict(), runs[name]["weights3"], atol=0)
