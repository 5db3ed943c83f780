"""GPU paths of weight sync, run where CUDA exists (``scripts/gpu_check.sh`` runs this
file); skipped on CPU machines, never faked.

- NCCL: trainer rank 0 on GPU 0 sends to a replica on GPU 1 (NCCL needs one GPU per
  rank), tensors arrive bit-equal on the receiver's GPU.
- One GPU: sender on CUDA, receiver on the CPU (a CPU rollout replica): the endpoints
  must agree on gloo and the receiver gets CPU tensors.
"""

from __future__ import annotations

import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

HOST = "127.0.0.1"
SPECS = [("embed.weight", (512, 64), torch.bfloat16), ("layer.0.w", (64, 64), torch.float32),
         ("layer.0.scale", (), torch.float32), ("norm.weight", (64,), torch.bfloat16)]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL weight sync needs two CUDA GPUs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _weights(device: str) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(name, torch.randn(shape, generator=g).to(dtype).to(device)) for name, shape, dtype in SPECS]


def _run(rank: int, port: int, devices: list[str], results) -> None:
    from rlpost.sync.transport import WeightReceiver, WeightSender, make_plan

    try:
        device = devices[rank]
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        plan = make_plan([(n, s, d) for n, s, d in SPECS], bucket_mb=0.05)
        if rank == 0:
            with WeightSender(HOST, port, 2, timeout_s=60, bucket_mb=0.05, device=device) as sender:
                sender.send(iter(_weights(device)), plan, version=1)
            results.put((rank, "ok"))
        else:
            with WeightReceiver(HOST, port, 1, 2, timeout_s=60, device=device) as receiver:
                got = [(name, t.clone()) for name, t in receiver.receive(plan, version=1)]
            want = _weights("cpu")
            same = all(n == m and t.device.type == torch.device(device).type and torch.equal(t.cpu(), w)
                       for (n, t), (m, w) in zip(got, want))
            results.put((rank, "ok" if same and len(got) == len(want) else f"mismatch: {[(n, t.device) for n, t in got]}"))
    except Exception:
        results.put((rank, traceback.format_exc()))


def _sync(devices: list[str]) -> dict:
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_run, args=(rank, port, devices, results)) for rank in range(2)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return out


@pytest.mark.integration
@needs_two_gpus
def test_nccl_weight_sync_between_two_gpus():
    assert _sync(["cuda:0", "cuda:1"]) == {0: "ok", 1: "ok"}


@pytest.mark.integration
@needs_cuda
def test_gpu_sender_cpu_receiver_agree_on_gloo():
    assert _sync(["cuda:0", "cpu"]) == {0: "ok", 1: "ok"}


@pytest.mark.integration
@needs_cuda
def test_hf_rollout_engine_runs_on_the_gpu(tmp_path):
    from rlpost.engines.hf_rollout import HFRolloutEngine
    from rlpost.models.loading import resolve_model_path
    from rlpost.types import SamplingParams

    engine = HFRolloutEngine(resolve_model_path("builtin:tiny-math"), seed=0, batch_size=8, device="cuda")
    assert next(engine.model.parameters()).device.type == "cuda"
    (group,) = engine.generate([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=4, temperature=1.0))
    assert len(group) == 2 and all(1 <= len(c.token_ids) <= 4 for c in group)
