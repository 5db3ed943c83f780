"""Weight sync where CUDA exists: the transport follows the endpoints' devices.

Skipped without CUDA. One GPU covers the mixed group (a CUDA sender, a CPU receiver:
gloo, staged through host memory); NCCL needs two GPUs, since NCCL refuses two ranks
of one communicator on the same device.
"""

from __future__ import annotations

import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from rlpost.sync.transport import WeightReceiver, WeightSender, make_plan
from test_weight_sync import load_stream  # the same loading as the CPU tests

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

HOST = "127.0.0.1"
TIMEOUT_S = 60.0
# A 4 MiB tensor travels alone (received in place with load_into); the small ones share a bucket.
SPECS = [("embed.weight", (1024, 1024), torch.float32), ("norm.weight", (1024,), torch.float32),
         ("bias", (7,), torch.bfloat16)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _weights(device) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(name, torch.randn(shape, generator=g).to(dtype).to(device)) for name, shape, dtype in SPECS]


def _sender(port, device, results):
    try:
        plan = make_plan(SPECS, bucket_mb=1)
        with WeightSender(HOST, port, 2, timeout_s=TIMEOUT_S, device=device) as sender:
            sender.send(iter(_weights(device)), plan, 1)
            results.put(("sender", f"{sender.backend} {sender.wire_device.type}"))
    except BaseException:
        results.put(("sender", traceback.format_exc()))


def _receiver(port, device, results):
    try:
        plan = make_plan(SPECS, bucket_mb=1)
        model = {name: torch.zeros(shape, dtype=dtype, device=device) for name, shape, dtype in SPECS}
        with WeightReceiver(HOST, port, 1, 2, timeout_s=TIMEOUT_S, device=device) as receiver:
            in_place = load_stream(receiver.receive(plan, 1), model)
            expected = dict(_weights("cpu"))
            wrong = [n for n, t in model.items() if not torch.equal(t.cpu(), expected[n])]
            results.put(("receiver", f"{receiver.backend} {receiver.wire_device.type} in place {in_place} "
                                     f"wrong {wrong}"))
    except BaseException:
        results.put(("receiver", traceback.format_exc()))


def _run(sender_device: str, receiver_device: str) -> dict[str, str]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_sender, args=(port, sender_device, results), daemon=True),
             ctx.Process(target=_receiver, args=(port, receiver_device, results), daemon=True)]
    for p in procs:
        p.start()
    try:
        return dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()


def test_cuda_sender_and_cpu_receiver_use_gloo_through_host_memory():
    out = _run("cuda:0", "cpu")
    assert out["sender"] == "gloo cpu", out
    assert out["receiver"] == "gloo cpu in place ['embed.weight'] wrong []", out


def test_cpu_sender_and_cuda_receiver_use_gloo_and_copy_to_the_device():
    out = _run("cpu", "cuda:0")
    assert out["sender"] == "gloo cpu", out
    # The receiver's tensors live on CUDA, the wire is host memory: nothing lands in place.
    assert out["receiver"] == "gloo cpu in place [] wrong []", out


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL refuses two ranks on one device)")
def test_two_cuda_endpoints_use_nccl_and_receive_in_place():
    out = _run("cuda:0", "cuda:1")
    assert out["sender"] == "nccl cuda", out
    assert out["receiver"] == "nccl cuda in place ['embed.weight'] wrong []", out
