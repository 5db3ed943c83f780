"""Weight sync over its own gloo group: one sender, two receivers, separate processes."""

from __future__ import annotations

import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from rlpost.errors import WorkerError
from rlpost.sync.transport import WeightReceiver, WeightSender, make_plan

HOST = "127.0.0.1"
TIMEOUT_S = 20.0
# Mixed shapes and dtypes: a 0-d tensor, an odd-sized bf16, an int tensor, and one
# tensor (40 KiB) larger than the 32 KiB bucket, which must travel alone.
SPECS = [
    ("embed.weight", (64, 32), torch.float32),  # 8 KiB
    ("layer.0.scale", (), torch.float32),
    ("layer.0.w", (33, 7), torch.bfloat16),
    ("layer.0.big", (80, 128), torch.float32),  # 40 KiB
    ("layer.1.idx", (5,), torch.int64),
    ("layer.1.w", (96, 64), torch.float32),  # 24 KiB
    ("norm.weight", (32,), torch.bfloat16),
]
BUCKET_MB = 32 / 1024



def load_stream(stream, model: dict) -> list[str]:
    """Load a receive stream into ``model`` as an engine does (``load_into``, then copy
    whatever did not land); the names that were received in place."""
    stream.load_into(model)
    in_place = []
    for name, tensor in stream:
        if tensor.data_ptr() == model[name].data_ptr():
            in_place.append(name)
        else:
            model[name].copy_(tensor)
    return in_place


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _weights(version: int) -> list[tuple[str, torch.Tensor]]:
    """Deterministic per-version tensors, so every process can rebuild the expected ones."""
    g = torch.Generator().manual_seed(1000 + version)
    out = []
    for name, shape, dtype in SPECS:
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=g).to(dtype)
        else:
            t = torch.randint(-(2**40), 2**40, shape, generator=g, dtype=dtype)
        out.append((name, t))
    return out


def _sender(port, world, plan, versions, results):
    torch.set_num_threads(1)
    try:
        with WeightSender(HOST, port, world, timeout_s=TIMEOUT_S, bucket_mb=BUCKET_MB) as sender:
            for version in versions:
                try:
                    sender.send(iter(_weights(version)), plan, version)
                    results.put(("sender", version, "ok"))
                except WorkerError as e:
                    results.put(("sender", version, f"WorkerError: {e}"))
    except BaseException:
        results.put(("sender", None, traceback.format_exc()))


def _receiver(port, rank, world, plan, versions, results):
    torch.set_num_threads(1)
    try:
        with WeightReceiver(HOST, port, rank, world, timeout_s=TIMEOUT_S) as receiver:
            for version in versions:
                try:
                    got = [(name, t.clone()) for name, t in receiver.receive(plan, version)]
                except WorkerError as e:
                    results.put((f"receiver{rank}", version, f"WorkerError: {e}"))
                    continue
                expected = _weights(version)
                same = [n for (n, t), (m, e) in zip(got, expected)
                        if n == m and t.dtype == e.dtype and t.shape == e.shape and torch.equal(t, e)]
                ok = len(got) == len(expected) == len(same)
                results.put((f"receiver{rank}", version, "ok" if ok else f"mismatch: {len(same)}/{len(expected)} equal"))
    except BaseException:
        results.put((f"receiver{rank}", None, traceback.format_exc()))


def _run(targets: list[tuple], expected_messages: int, timeout_s: float = 60.0) -> list[tuple]:
    """Start one process per (fn, args), collect ``expected_messages`` results, and
    always reap the processes we started."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(*args, results), daemon=True) for fn, args in targets]
    for p in procs:
        p.start()
    out = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < expected_messages:
            out.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return out


def test_plan_buckets_respect_size_and_order():
    plan = make_plan(SPECS, bucket_mb=BUCKET_MB)
    limit = 32 * 1024
    assert [s.name for b in plan.buckets for s in b.slots] == [name for name, _, _ in SPECS]
    # By hand, 64-byte aligned: 8192 + 4 + 462 B fit one 32 KiB bucket; the 40 KiB tensor
    # goes alone; then 40 + 24576 + 64 B (ending at 24704) share the last one.
    assert [[s.name for s in b.slots] for b in plan.buckets] == [
        ["embed.weight", "layer.0.scale", "layer.0.w"],
        ["layer.0.big"],
        ["layer.1.idx", "layer.1.w", "norm.weight"],
    ]
    for bucket in plan.buckets:
        assert bucket.nbytes <= limit or len(bucket.slots) == 1
        assert all(s.offset % 64 == 0 for s in bucket.slots)
        assert max(s.offset + s.nbytes for s in bucket.slots) == bucket.nbytes
    assert plan.buckets[1].nbytes == 80 * 128 * 4
    assert make_plan(SPECS, BUCKET_MB).fingerprint == plan.fingerprint
    assert make_plan(SPECS, 1.0).fingerprint != plan.fingerprint


def test_two_receivers_get_identical_tensors_and_version_mismatch_fails_everywhere():
    port, world = _free_port(), 3
    plan = make_plan(SPECS, bucket_mb=BUCKET_MB)
    # Sync 1: everyone at version 1. Sync 2: receiver 2 is asked for a stale version 1
    # while the others are at version 2. Sync 3: everyone at version 3, which shows a
    # refused handshake leaves the group usable.
    results = _run([
        (_sender, (port, world, plan, [1, 2, 3])),
        (_receiver, (port, 1, world, plan, [1, 2, 3])),
        (_receiver, (port, 2, world, plan, [1, 1, 3])),
    ], expected_messages=9)
    msgs: dict[str, list] = {}
    for who, version, msg in results:
        assert version is not None, msg  # a crash, with its traceback
        msgs.setdefault(who, []).append((version, msg))
    for who in ("sender", "receiver1", "receiver2"):
        first, second, third = msgs[who]
        assert first == (1, "ok"), (who, first)
        assert second[1].startswith("WorkerError") and "version mismatch" in second[1], (who, second)
        assert "versions 1..2" in second[1], (who, second)
        assert third == (3, "ok"), (who, third)


def _silent_sender(port, world, hold_s, results):
    """Joins the group, never sends, stays alive while the receiver waits."""
    torch.set_num_threads(1)
    try:
        with WeightSender(HOST, port, world, timeout_s=TIMEOUT_S, bucket_mb=BUCKET_MB):
            results.put(("sender", 0, "joined"))
            time.sleep(hold_s)
    except BaseException:
        results.put(("sender", None, traceback.format_exc()))


def _timing_receiver(port, world, timeout_s, results):
    torch.set_num_threads(1)
    plan = make_plan(SPECS, bucket_mb=BUCKET_MB)
    try:
        receiver = WeightReceiver(HOST, port, 1, world, timeout_s=timeout_s)
    except BaseException:
        results.put(("receiver1", None, traceback.format_exc()))
        return
    start = time.monotonic()
    try:
        list(receiver.receive(plan, 1))
        results.put(("receiver1", 1, "received without a sender"))
    except WorkerError as e:
        results.put(("receiver1", 1, f"WorkerError after {time.monotonic() - start:.1f}s: {e}"))
    except BaseException:
        results.put(("receiver1", None, traceback.format_exc()))
    finally:
        receiver.close()


def test_receiver_times_out_with_worker_error_when_sender_never_sends():
    port = _free_port()
    results = _run([(_silent_sender, (port, 2, 6.0)), (_timing_receiver, (port, 2, 2.0))], expected_messages=2)
    msg = dict((who, msg) for who, _, msg in results)["receiver1"]
    assert msg.startswith("WorkerError after"), msg
    assert float(msg.split("after ")[1].split("s:")[0]) < 6.0


def test_receiver_without_sender_fails_to_join_with_worker_error():
    start = time.monotonic()
    with pytest.raises(WorkerError, match="could not join"):
        WeightReceiver(HOST, _free_port(), 1, 2, timeout_s=1.0)
    assert time.monotonic() - start < 10.0


def test_tensors_of_alone_mb_or_more_travel_alone():
    # By hand, alone_mb = 16 KiB: the 40 KiB and 24 KiB tensors each get a bucket;
    # the rest pack in order (8192 + 4 + 462 B; then 40 B; then 64 B).
    plan = make_plan(SPECS, bucket_mb=BUCKET_MB, alone_mb=16 / 1024)
    assert [[s.name for s in b.slots] for b in plan.buckets] == [
        ["embed.weight", "layer.0.scale", "layer.0.w"],
        ["layer.0.big"],
        ["layer.1.idx"],
        ["layer.1.w"],
        ["norm.weight"],
    ]
    assert [b.alone for b in plan.buckets] == [False, True, True, True, True]
    assert plan.packed_nbytes == 8256 + 462  # the only bucket with more than one tensor
    assert plan.fingerprint != make_plan(SPECS, bucket_mb=BUCKET_MB).fingerprint


def test_cpu_endpoints_choose_gloo():
    """Two endpoints in threads of this process, both on the CPU."""
    import threading

    port, out = _free_port(), {}

    def receiver():
        with WeightReceiver(HOST, port, 1, 2, timeout_s=TIMEOUT_S, device="cpu") as r:
            out["receiver"] = (r.backend, r.wire_device.type)

    thread = threading.Thread(target=receiver)
    thread.start()
    with WeightSender(HOST, port, 2, timeout_s=TIMEOUT_S) as sender:  # no device given: CPU
        out["sender"] = (sender.backend, sender.wire_device.type)
    thread.join(TIMEOUT_S)
    assert out == {"sender": ("gloo", "cpu"), "receiver": ("gloo", "cpu")}


ALONE_MB = 16 / 1024


def _loading_receiver(port, world, versions, results):
    """Loads each sync into its own tensors through ``load_into``, as an engine does.
    ``layer.1.w``'s target has another dtype, so it cannot be received in place."""
    torch.set_num_threads(1)
    plan = make_plan(SPECS, bucket_mb=BUCKET_MB, alone_mb=ALONE_MB)
    model = {name: torch.zeros(shape, dtype=dtype) for name, shape, dtype in SPECS}
    model["layer.1.w"] = torch.zeros((96, 64), dtype=torch.float64)
    try:
        with WeightReceiver(HOST, port, 1, world, timeout_s=TIMEOUT_S) as receiver:
            for version in versions:
                in_place = load_stream(receiver.receive(plan, version), model)
                expected = dict(_weights(version))
                wrong = [n for n, t in model.items() if not torch.equal(t, expected[n].to(t.dtype))]
                results.put(("receiver1", version, f"in place {in_place}; wrong {wrong}"))
    except BaseException:
        results.put(("receiver1", None, traceback.format_exc()))


def _plan_sender(port, world, versions, results, specs=SPECS, bucket_mb=BUCKET_MB, alone_mb=ALONE_MB,
                 weights=_weights):
    """Sends ``weights(version)`` for each version with the plan of ``specs``."""
    torch.set_num_threads(1)
    plan = make_plan(specs, bucket_mb=bucket_mb, alone_mb=alone_mb)
    try:
        with WeightSender(HOST, port, world, timeout_s=TIMEOUT_S) as sender:
            for version in versions:
                sender.send(iter(weights(version)), plan, version)
                results.put(("sender", version, "ok"))
    except BaseException:
        results.put(("sender", None, traceback.format_exc()))


def test_load_into_receives_alone_tensors_in_place_and_reuses_staging_across_syncs():
    port = _free_port()
    results = _run([(_plan_sender, (port, 2, [1, 2])), (_loading_receiver, (port, 2, [1, 2]))],
                   expected_messages=4)
    by = {(who, version): msg for who, version, msg in results}
    assert all(v is not None for _, v in by), results
    # By hand (see the plan test above): every one-tensor bucket whose target has its
    # dtype lands in the model: the 40 KiB tensor and the int and bf16 tensors left
    # alone around the 24 KiB one; that one's float64 target does not match.
    for version in (1, 2):
        assert by[("sender", version)] == "ok"
        assert by[("receiver1", version)] == "in place ['layer.0.big', 'layer.1.idx', 'norm.weight']; wrong []"


class _Recording:
    """Passes a stream to an engine and notes which tensors it yielded in the engine's
    own storage (received in place)."""

    def __init__(self, stream, storage: dict[str, int]):
        self.stream, self.storage, self.in_place = stream, storage, []

    def load_into(self, targets):
        self.stream.load_into(targets)

    def __iter__(self):
        for name, tensor in self.stream:
            if tensor.data_ptr() == self.storage.get(name):
                self.in_place.append(name)
            yield name, tensor


def _model_weights(model_dir: str, version: int) -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    return [(name, t + 0.125 * version) for name, t in state.items()]  # exact in fp32 at these scales


def _model_sender(port, model_dir, results):
    torch.set_num_threads(1)
    try:
        weights = _model_weights(model_dir, 1)
        plan = make_plan([(n, t.shape, t.dtype) for n, t in weights], bucket_mb=BUCKET_MB, alone_mb=1 / 1024)
        with WeightSender(HOST, port, 2, timeout_s=TIMEOUT_S) as sender:
            sender.send(iter(weights), plan, 1)
        results.put(("sender", 1, f"ok {sum(b.alone for b in plan.buckets)} alone"))
    except BaseException:
        results.put(("sender", None, traceback.format_exc()))


def _engine_receiver(port, model_dir, results):
    from rlpost.engines.hf_rollout import HFRolloutEngine

    torch.set_num_threads(1)
    try:
        engine = HFRolloutEngine(model_dir)
        storage = {n: t.data_ptr() for n, t in engine.model.state_dict().items()}
        expected = _model_weights(model_dir, 1)
        plan = make_plan([(n, t.shape, t.dtype) for n, t in expected], bucket_mb=BUCKET_MB, alone_mb=1 / 1024)
        with WeightReceiver(HOST, port, 1, 2, timeout_s=TIMEOUT_S) as receiver:
            stream = _Recording(receiver.receive(plan, 1), storage)
            engine.update_weights(stream, 1)
        state = engine.model.state_dict()
        wrong = [n for n, t in expected if not torch.equal(state[n], t)]
        moved = [n for n, t in state.items() if t.data_ptr() != storage[n]]
        results.put(("receiver1", engine.policy_version,
                     f"{len(stream.in_place)} in place; wrong {wrong}; moved {moved}"))
    except BaseException:
        results.put(("receiver1", None, traceback.format_exc()))


def test_hf_engine_loads_a_stream_in_place(tmp_path):
    from rollout_contract import char_tokenizer, save_model

    model_dir = save_model(tmp_path / "model", char_tokenizer(), tie=False)
    shapes = [(n, t.shape, t.dtype) for n, t in _model_weights(model_dir, 0)]
    plan = make_plan(shapes, bucket_mb=BUCKET_MB, alone_mb=1 / 1024)
    alone = sum(b.alone for b in plan.buckets)
    assert alone >= 10  # the 2-layer model's matrices (>= 1 KiB) each travel alone
    port = _free_port()
    results = _run([(_model_sender, (port, model_dir, )), (_engine_receiver, (port, model_dir))],
                   expected_messages=2, timeout_s=120)
    by = {who: (version, msg) for who, version, msg in results}
    assert by["sender"] == (1, f"ok {alone} alone"), by
    # Every one-tensor bucket lands in the engine's parameters; the packed rest is copied.
    assert by["receiver1"] == (1, f"{alone} in place; wrong []; moved []"), by


# A deep window: one 20 MiB tensor sets the window to 40 MiB (twice the largest
# bucket); twelve 3 MiB tensors below alone_mb pack three to a 9 MiB bucket, so
# each endpoint keeps staging_count(9 MiB) = 2 staging buffers and a third packed
# bucket must wait for one to come back; seven 4 MiB tensors at alone_mb travel
# alone, up to eight of them in flight. bf16 and int64 among them.
DEEP_SPECS = ([("big", (1280, 4096), torch.float32)]
              + [(f"packed.{i}", (768, 1024), torch.float32) for i in range(12)]
              + [(f"alone.{i}", (1024, 1024), torch.float32) for i in range(5)]
              + [("alone.bf16", (1024, 2048), torch.bfloat16), ("alone.int", (512, 1024), torch.int64)])
DEEP_BUCKET_MB, DEEP_ALONE_MB = 9, 4


def _deep_weights(version: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2000 + version)
    return [(name, torch.randn(shape, generator=g).to(dtype) if dtype.is_floating_point
             else torch.randint(-(2**40), 2**40, shape, generator=g, dtype=dtype)) for name, shape, dtype in DEEP_SPECS]


def _deep_sender(port, world, versions, results):
    _plan_sender(port, world, versions, results, DEEP_SPECS, DEEP_BUCKET_MB, DEEP_ALONE_MB, _deep_weights)


def _deep_receiver(port, rank, world, versions, results):
    """Rank 1 loads in place (``load_into``); rank 2 keeps the fresh tensors it is given."""
    torch.set_num_threads(1)
    plan = make_plan(DEEP_SPECS, DEEP_BUCKET_MB, DEEP_ALONE_MB)
    model = {name: torch.zeros(shape, dtype=dtype) for name, shape, dtype in DEEP_SPECS}
    try:
        with WeightReceiver(HOST, port, rank, world, timeout_s=TIMEOUT_S) as receiver:
            for version in versions:
                stream = receiver.receive(plan, version)
                if rank == 1:
                    in_place = len(load_stream(stream, model))
                    got = model
                else:
                    in_place, got = 0, dict(stream)
                expected = _deep_weights(version)
                wrong = [n for n, e in expected if not (got[n].dtype == e.dtype and torch.equal(got[n], e))]
                results.put((f"receiver{rank}", version, f"{in_place} in place; {len(got)} tensors; wrong {wrong}"))
    except BaseException:
        results.put((f"receiver{rank}", None, traceback.format_exc()))


def test_deep_pipeline_with_scarce_staging_delivers_identical_tensors():
    plan = make_plan(DEEP_SPECS, DEEP_BUCKET_MB, DEEP_ALONE_MB)
    # By hand: big | 4 buckets of 3 x 3 MiB | 7 alone = 12 buckets; the window is 40 MiB.
    assert [len(b.slots) for b in plan.buckets] == [1, 3, 3, 3, 3] + [1] * 7
    assert plan.window_nbytes == 40 * 2**20 and plan.packed_nbytes == 9 * 2**20
    port, world = _free_port(), 3
    results = _run([(_deep_sender, (port, world, [1, 2])), (_deep_receiver, (port, 1, world, [1, 2])),
                    (_deep_receiver, (port, 2, world, [1, 2]))], expected_messages=6, timeout_s=120)
    by = {(who, version): msg for who, version, msg in results}
    assert all(v is not None for _, v in by), results
    for version in (1, 2):
        assert by[("sender", version)] == "ok"
        # Rank 1: the 8 one-tensor buckets land in the model; the 12 packed ones are copied.
        assert by[("receiver1", version)] == "8 in place; 20 tensors; wrong []"
        assert by[("receiver2", version)] == "0 in place; 20 tensors; wrong []"


def test_empty_tensors_that_cannot_land_still_arrive():
    """A zero-element tensor alone in its bucket whose target has another dtype needs a
    (zero-byte) staging buffer; the stream must still deliver it and everything after."""
    import threading

    specs = [("empty", (0,), torch.float32), ("w", (300, 1024), torch.float32)]
    plan = make_plan(specs, bucket_mb=1, alone_mb=1.0)
    assert [[s.name for s in b.slots] for b in plan.buckets] == [["empty"], ["w"]]
    sent = {"empty": torch.zeros(0), "w": torch.randn(300, 1024, generator=torch.Generator().manual_seed(3))}
    model = {"empty": torch.zeros(0, dtype=torch.float64), "w": torch.zeros(300, 1024)}
    port, got = _free_port(), {}

    def receiver():
        with WeightReceiver(HOST, port, 1, 2, timeout_s=TIMEOUT_S) as r:
            got["names"] = [name for name, _ in _Logged(r.receive(plan, 1), model)]

    thread = threading.Thread(target=receiver)
    thread.start()
    with WeightSender(HOST, port, 2, timeout_s=TIMEOUT_S) as sender:
        sender.send(iter(sent.items()), plan, 1)
    thread.join(TIMEOUT_S)
    assert got["names"] == ["empty", "w"]
    assert model["empty"].shape == (0,) and torch.equal(model["w"], sent["w"])


class _Logged:
    """Loads a stream into ``model`` (``load_stream``) and yields what it loaded."""

    def __init__(self, stream, model):
        self.stream, self.model = stream, model

    def __iter__(self):
        self.stream.load_into(self.model)
        for name, tensor in self.stream:
            if tensor.data_ptr() != self.model[name].data_ptr():
                self.model[name].copy_(tensor)
            yield name, tensor
