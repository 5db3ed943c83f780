"""Weight sync: trainer rank 0 -> rollout replicas, bucketed, pipelined and versioned.

Weights travel over a dedicated process group, never through the Ray object store
and never through the trainer's own group: rank 0 is trainer rank 0 (the sender),
ranks 1..R are the R rollout replicas (receivers). The group is built from its own
``TCPStore`` on a port the driver picks.

Transport. Each endpoint is given the device its tensors live on (``device=``,
default CPU). At setup every rank publishes its device type in the group's store
and reads everyone else's; ``choose_backend`` then picks NCCL when *every* rank is
on CUDA and gloo otherwise, so the choice is made where the tensors live, never on
the driver. On a mixed group (some ranks on CUDA, some on CPU) the CUDA ranks stage
through host memory: the sender copies each tensor to CPU before it goes on the
wire, and a CUDA receiver yields CPU tensors that its engine copies to its device.
``endpoint.backend`` and ``endpoint.wire_device`` say what was chosen.

Contract
--------
Setup (once, or again after any failure). The driver picks a free port and calls,
*concurrently*, ``WeightSender(host, port, R + 1, ...)`` on trainer rank 0 and
``WeightReceiver(host, port, r, R + 1, ...)`` on replica r = 1..R. Each constructor
blocks until all R + 1 ranks have joined, or raises ``WorkerError`` after
``timeout_s``.

One sync, to policy version v:
1. Plan (once; again only if the weight names/shapes change). ``make_plan(specs,
   bucket_mb)`` (or ``sender.plan(specs)``) turns the ``(name, shape, dtype)`` list,
   e.g. ``FSDPEngine.named_weight_shapes()``, into a ``SyncPlan``: a small frozen,
   picklable layout. A tensor of at least ``alone_mb`` (1 MiB) or larger than a
   bucket travels alone; smaller ones are packed into buckets of at most
   ``bucket_mb``. The driver hands the same plan to every rank through Ray.
2. Concurrently, with the same ``version`` everywhere:
   - trainer rank 0: ``sender.send(engine.named_full_weights(), plan, v)``;
   - other trainer ranks: drain ``engine.named_full_weights()`` (it is collective);
   - replica r: ``engine.update_weights(receiver.receive(plan, v), v)``.
3. Every rank first joins a handshake that compares versions and plan layouts; on
   any mismatch *every* rank raises ``WorkerError`` and nothing is sent (the group
   stays usable).
   Then buckets are broadcast in plan order, pipelined up to eight deep
   (``_DEPTH``) within a byte window: the sender starts bucket i's broadcast and,
   while it is on the wire, pulls and packs the next ones (for FSDP those are the
   next all-gathers), waiting for the oldest broadcast only when the window is
   full or it needs that broadcast's staging buffer. A receiver keeps the same
   window of buckets posted ahead while its consumer loads the oldest. The window
   (``in_flight_full``) admits a bucket while fewer than two are in flight, or
   fewer than eight that together stay within twice the plan's largest bucket:
   never more bytes than a two-deep pipeline holds at its worst.

Receiving. ``receive`` returns a ``WeightStream`` of ``(name, tensor)`` in plan
order, on ``wire_device``. By default each bucket arrives in fresh memory and the
consumer may keep the tensors (vLLM's loader holds a layer's tensors until the
layer is complete). A consumer that copies each tensor as it comes (an in-place
load) first calls ``stream.load_into(targets)`` (name -> its own tensors): a
tensor travelling alone whose target has its shape and dtype, is contiguous and
lives on the wire device is received straight into the target, and the stream
yields the target itself; the others are views into two reused staging buffers,
valid only until the stream moves past their bucket.

Versions. The sync layer holds no version itself: a replica holds version v once
``update_weights`` has consumed the whole stream; until then it still holds the
previous version (the caller must not generate mid-sync; with ``load_into`` the
engine's tensors are written while the stream runs). The trainer's weights are
version v as soon as ``send`` is called.

Memory. The sender keeps staging buffers the size of the plan's largest packed
bucket (at most ``bucket_mb``; tensors of ``alone_mb`` or more are never packed):
as many as fit in 16 MiB, at least two and at most eight, reused from the first
sync until ``close``. It holds the trainer's tensors while they are on the wire
(zero-copy), as many as the window admits: at most twice the plan's largest
bucket in bytes, or two tensors. A receiver with ``load_into`` keeps staging
buffers the same way for the buckets that cannot land in a target; without it,
each bucket gets fresh memory (the window's worth in flight, plus whatever the
consumer keeps).

Failure. Any collective that does not finish within ``timeout_s`` (a dead replica,
a sender that never sends, an unconsumed stream) raises ``WorkerError``; the
sender and receivers are then unusable and must be re-created on a fresh port. If
``send`` fails part-way it still drains the weight iterator, so the trainer's own
collective in ``named_full_weights`` stays in step on all ranks. Closing an
endpoint with a broadcast in flight waits for it to finish or time out. On NCCL a
timeout is enforced by the NCCL watchdog, which by default tears the process down
rather than raising (no test covers an NCCL timeout).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import torch
import torch.distributed as dist

from rlpost.distributed import store_on
from rlpost.errors import WorkerError

_ALIGN = 64  # byte alignment of tensors inside a bucket (any dtype can view there)
_LOOPBACK = ("127.0.0.1", "localhost")
# Most broadcasts in flight per rank. Two would keep the wire busy if posting the
# next one were free, but every gloo message waits for its receiver to post the
# matching recv, and each post is a hop between threads (and processes) that costs
# 0.1-1 ms on a busy 2-core host: longer than a 1-4 MiB tensor takes on the wire.
# With eight posted ahead on both ends that latency overlaps the transfers (a 57M
# model to one receiver, load average 5-9, same invocations: a whole sync at 0.99
# of one flat broadcast eight deep against 0.79 two deep, medians of three runs;
# docs/performance.md). gloo gets as many worker threads, so every posted
# broadcast is running and a timeout is reached by all of them at once.
_DEPTH = 8
# Staging buffers (for buckets that hold several small tensors) per endpoint: up to
# _DEPTH while they total at most this many bytes, never fewer than two.
_STAGING_NBYTES = 16 * 2**20
_DEVICE_KEY = "rlpost/weight_sync/device/{}"


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in its bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the bucket start
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    slots: tuple[TensorSlot, ...]

    @property
    def alone(self) -> bool:
        """One tensor that fills the bucket: sent from its own storage, received into a target."""
        return len(self.slots) == 1


@dataclass(frozen=True)
class SyncPlan:
    """Layout of a sync: tensors in send order, packed into byte buckets. Holds no
    version; the same plan serves every sync while names and shapes stay put."""

    buckets: tuple[Bucket, ...]

    @cached_property
    def fingerprint(self) -> int:
        """62-bit hash of the layout; equal plans have equal prints on every host."""
        text = repr([(i, s.name, s.shape, str(s.dtype), s.offset)
                     for i, b in enumerate(self.buckets) for s in b.slots])
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2

    @property
    def num_tensors(self) -> int:
        return sum(len(b.slots) for b in self.buckets)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the largest bucket holding more than one tensor (0 if none)."""
        return max((b.nbytes for b in self.buckets if not b.alone), default=0)

    @property
    def window_nbytes(self) -> int:
        """Bytes the broadcasts in flight may hold together beyond the first two:
        twice the largest bucket (what a two-deep pipeline holds at its worst)."""
        return 2 * max((b.nbytes for b in self.buckets), default=0)


def in_flight_full(count: int, nbytes: int, next_nbytes: int, window_nbytes: int, depth: int = _DEPTH) -> bool:
    """Whether ``count`` broadcasts in flight holding ``nbytes`` leave no room for
    one more of ``next_nbytes``: two always fit, never more than ``depth``, and in
    between only while all of them stay within ``window_nbytes``."""
    if count < 2:
        return False
    return count >= depth or nbytes + next_nbytes > window_nbytes


def staging_count(nbytes: int | None, depth: int = _DEPTH) -> int:
    """Staging buffers of ``nbytes`` (the largest bucket that needs one; None: no
    bucket does) an endpoint keeps: as many as fit in ``_STAGING_NBYTES``, at least
    two, at most ``depth``."""
    if nbytes is None:
        return 0
    return max(2, min(depth, _STAGING_NBYTES // max(nbytes, 1)))


def make_plan(specs: Iterable[tuple[str, Iterable[int], torch.dtype]], bucket_mb: float = 64,
              alone_mb: float = 1.0) -> SyncPlan:
    """Pack ``(name, shape, dtype)`` in the given order into buckets of at most
    ``bucket_mb`` MiB; dtypes may mix (buckets are bytes). A tensor larger than a
    bucket, or of at least ``alone_mb`` MiB, gets a bucket of its own: packing it
    would cost a copy on each end, and alone it costs one more broadcast."""
    limit, alone = int(bucket_mb * 2**20), int(alone_mb * 2**20)
    buckets: list[Bucket] = []
    slots: list[TensorSlot] = []
    used = 0
    for name, shape, dtype in specs:
        shape = tuple(int(d) for d in shape)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if nbytes >= alone and slots:
            buckets.append(Bucket(used, tuple(slots)))
            slots, used = [], 0
        offset = -(-used // _ALIGN) * _ALIGN
        if slots and offset + nbytes > limit:
            buckets.append(Bucket(used, tuple(slots)))
            slots, offset = [], 0
        slots.append(TensorSlot(name, shape, dtype, offset, nbytes))
        used = offset + nbytes
        if nbytes >= alone:
            buckets.append(Bucket(used, tuple(slots)))
            slots, used = [], 0
    if slots:
        buckets.append(Bucket(used, tuple(slots)))
    return SyncPlan(buckets=tuple(buckets))


def choose_backend(device_types: Sequence[str]) -> str:
    """The sync group's transport from every rank's device type: ``"nccl"`` when all
    ranks hold their tensors on CUDA, ``"gloo"`` otherwise (gloo runs on host memory,
    so a mixed group stages its CUDA tensors through the CPU)."""
    if not device_types:
        raise ValueError("choose_backend needs the device type of at least one rank")
    return "nccl" if all(t == "cuda" for t in device_types) else "gloo"


class _Channel:
    """A process group of its own (not the default group, not registered with
    torch.distributed), its transport chosen from every rank's device."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.timeout = timedelta(seconds=timeout_s)
        try:
            # TCPStore alone listens on every interface; store_on binds only to host.
            self.store = store_on(host, port, rank, world_size, timeout_s)
            self.store.set(_DEVICE_KEY.format(rank), device.type)
            types = [self.store.get(_DEVICE_KEY.format(r)).decode() for r in range(world_size)]
            self.backend = choose_backend(types)
            self.wire_device = device if self.backend == "nccl" else torch.device("cpu")
            self.pg = self._make_group(host, rank, world_size)
        except (RuntimeError, OSError) as e:  # DistNetworkError/DistStoreError are RuntimeErrors
            self.close()
            raise WorkerError(f"weight sync rank {rank}/{world_size} could not join the group at "
                              f"{host}:{port} within {timeout_s}s: {e}") from e

    def _make_group(self, host: str, rank: int, world_size: int):
        if self.backend == "nccl":
            # A standalone NCCL communicator over our own store, as
            # torch.distributed._dist2's NCCL factory builds one.
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            pg = dist.ProcessGroupNCCL(self.store, rank, world_size, opts)
            pg.eager_connect_single_device(self.device)
            return pg
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = self.timeout
        opts._threads = _DEPTH  # one worker per broadcast in flight (see _DEPTH)
        # On one machine bind gloo's sockets to loopback; otherwise gloo's default
        # device (GLOO_SOCKET_IFNAME or the hostname's address).
        device = (dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if host in _LOOPBACK
                  else dist.ProcessGroupGloo.create_default_device())
        opts._devices = [device]
        return dist.ProcessGroupGloo(self.store, rank, world_size, opts)

    def broadcast(self, tensor: torch.Tensor):
        """Start a broadcast from rank 0; returns its work handle."""
        return self.pg.broadcast(tensor, 0)

    def all_reduce_max(self, tensor: torch.Tensor) -> None:
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.pg.allreduce([tensor], opts).wait()

    def close(self) -> None:
        for name in ("pg", "store"):
            if hasattr(self, name):
                delattr(self, name)


def _resolve(device: torch.device | str | None) -> torch.device:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and device.index is None:  # NCCL binds one device
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _Endpoint:
    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float,
                 device: torch.device | str | None):
        if world_size < 2:
            raise ValueError(f"weight sync needs a sender and at least one receiver, got world_size={world_size}")
        self.rank, self.timeout_s = rank, timeout_s
        self._channel: _Channel | None = _Channel(host, port, rank, world_size, timeout_s, _resolve(device))
        self._broken: str | None = None
        # Broadcasts in flight at most; below _DEPTH only to measure the old two-deep
        # pipeline beside it (scripts/bench_weight_sync.py --depth).
        self._depth = _DEPTH
        self._staging: list[torch.Tensor] = []  # reused bucket buffers, see the module's Memory

    @property
    def device(self) -> torch.device:
        """Where this endpoint's tensors live (as given)."""
        return self._require().device

    @property
    def wire_device(self) -> torch.device:
        """Where tensors travel: ``device`` on NCCL, the CPU on gloo."""
        return self._require().wire_device

    @property
    def backend(self) -> str:
        return self._require().backend

    def _require(self) -> _Channel:
        if self._channel is None:
            raise WorkerError(f"weight sync rank {self.rank} is closed" + (f" after: {self._broken}" if self._broken else ""))
        return self._channel

    def _failed(self, what: str, e: RuntimeError) -> WorkerError:
        self._broken = f"{what} failed: {e}"
        self.close()
        return WorkerError(f"weight sync rank {self.rank}: {what} did not complete within "
                           f"{self.timeout_s}s (a peer died or never joined): {e}")

    def _start(self, what: str, tensor: torch.Tensor):
        try:
            return self._require().broadcast(tensor)
        except RuntimeError as e:  # gloo timeouts and peer resets
            raise self._failed(what, e) from e

    def _finish(self, what: str, work) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise self._failed(what, e) from e

    def _staging_buffers(self, nbytes: int | None) -> list[torch.Tensor]:
        """``staging_count(nbytes)`` reused byte buffers of at least ``nbytes`` on the
        wire device (None: no bucket needs one)."""
        count = staging_count(nbytes, self._depth)
        if count and (len(self._staging) != count or self._staging[0].numel() < nbytes):
            self._staging = []  # drop the old ones before allocating the new
            self._staging = [torch.empty(nbytes, dtype=torch.uint8, device=self.wire_device) for _ in range(count)]
        return list(self._staging)

    def _handshake(self, plan: SyncPlan, version: int) -> None:
        """Every rank contributes (version, layout); all raise unless all agree."""
        v, fp = int(version), plan.fingerprint
        t = torch.tensor([v, -v, fp, -fp], dtype=torch.int64, device=self.wire_device)
        what = f"handshake for version {v}"
        try:
            self._require().all_reduce_max(t)
        except RuntimeError as e:
            raise self._failed(what, e) from e
        max_v, min_v, max_fp, min_fp = t[0].item(), -t[1].item(), t[2].item(), -t[3].item()
        if max_v != min_v:
            raise WorkerError(f"weight sync version mismatch: ranks were asked for versions {min_v}..{max_v} "
                              f"(this rank: {v}); every rank of one sync must be given the same version")
        if max_fp != min_fp:
            raise WorkerError(f"weight sync layout mismatch at version {v}: ranks hold different SyncPlans "
                              "(tensor names, shapes, dtypes or bucket size differ)")

    def _abandon(self, reason: str) -> None:
        """A sync stopped between buckets: the group is out of step for good."""
        if self._channel is not None:
            self._broken = reason
            self.close()

    def close(self) -> None:
        self._staging = []
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WeightSender(_Endpoint):
    """Rank 0 of the sync group; lives on trainer rank 0."""

    def __init__(self, host: str, port: int, world_size: int, timeout_s: float = 300.0, bucket_mb: float = 64,
                 device: torch.device | str | None = None):
        self.bucket_mb = bucket_mb
        super().__init__(host, port, 0, world_size, timeout_s, device)

    def plan(self, specs: Iterable[tuple[str, Iterable[int], torch.dtype]]) -> SyncPlan:
        """``make_plan`` with this sender's ``bucket_mb``."""
        return make_plan(specs, self.bucket_mb)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], plan: SyncPlan, version: int) -> None:
        """Broadcast ``named_tensors`` (in plan order) to every receiver. Blocks until
        the last bucket is out. Always exhausts ``named_tensors``, even on failure."""
        it = iter(named_tensors)
        try:
            self._handshake(plan, version)
            try:
                self._send_buckets(plan, it, f"bucket broadcast (version {version})")
            except BaseException as e:
                self._abandon(f"send of version {version} stopped: {e!r}")
                raise
            leftover = next(it, None)
            if leftover is not None:
                raise WorkerError(f"weight sync: tensor {leftover[0]!r} is not in the plan (version {version})")
        finally:
            for _ in it:  # keep the trainer's collective iterator in step on all ranks
                pass

    def _send_buckets(self, plan: SyncPlan, it: Iterator[tuple[str, torch.Tensor]], what: str) -> None:
        free = self._staging_buffers(plan.packed_nbytes if any(not b.alone for b in plan.buckets) else None)
        in_flight: deque = deque()  # (work, staging buffer or None, tensor kept alive while on the wire)
        held = 0  # bytes of the broadcasts in flight
        for bucket in plan.buckets:
            while in_flight and (in_flight_full(len(in_flight), held, bucket.nbytes, plan.window_nbytes, self._depth)
                                 or (not bucket.alone and not free)):
                held -= self._retire(in_flight.popleft(), free, what)
            if bucket.alone:  # zero-copy: the trainer's own tensor goes on the wire
                buffer, data = None, self._next_bytes(bucket.slots[0], it)
            else:
                buffer = free.pop()
                data = buffer[:bucket.nbytes]
                for slot in bucket.slots:
                    data[slot.offset: slot.offset + slot.nbytes].copy_(self._next_bytes(slot, it))
            in_flight.append((self._start(what, data), buffer, data))
            held += bucket.nbytes
        while in_flight:
            self._retire(in_flight.popleft(), free, what)

    def _retire(self, entry, free: list[torch.Tensor], what: str) -> int:
        """Wait for the oldest broadcast; returns the bytes it held."""
        work, buffer, data = entry
        self._finish(what, work)
        if buffer is not None:
            free.append(buffer)
        return data.numel()

    def _next_bytes(self, slot: TensorSlot, it: Iterator[tuple[str, torch.Tensor]]) -> torch.Tensor:
        name, tensor = next(it, (None, None))
        if name != slot.name or tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            got = "nothing" if name is None else f"{name!r} {tuple(tensor.shape)} {tensor.dtype}"
            raise WorkerError(f"weight sync: plan expects {slot.name!r} {slot.shape} {slot.dtype}, "
                              f"the weights gave {got}; rebuild the plan from the engine's named_weight_shapes()")
        return _as_bytes(tensor.to(self.wire_device))


class WeightReceiver(_Endpoint):
    """Rank ``rank`` (1..R) of the sync group; lives on a rollout replica."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float = 300.0,
                 device: torch.device | str | None = None):
        if not 1 <= rank < world_size:
            raise ValueError(f"receiver rank must be in 1..{world_size - 1}, got {rank}")
        super().__init__(host, port, rank, world_size, timeout_s, device)

    def receive(self, plan: SyncPlan, version: int) -> WeightStream:
        """The ``(name, tensor)`` stream of one sync, in plan order. Lazy: nothing
        happens until iteration starts, and it must be iterated to the end."""
        return WeightStream(self, plan, version)

    def _receive(self, plan: SyncPlan, version: int,
                 targets: Mapping[str, torch.Tensor] | None) -> Iterator[tuple[str, torch.Tensor]]:
        self._handshake(plan, version)
        what = f"bucket receive (version {version})"
        try:
            landing = [self._landing(b, targets) for b in plan.buckets]
            if targets is not None:
                staged = [b.nbytes for b, t in zip(plan.buckets, landing) if t is None]
                free = self._staging_buffers(max(staged) if staged else None)
            posted: deque = deque()  # (bucket, bytes it arrives in, staging buffer or None, work)
            nxt, held = 0, 0  # next bucket to post; bytes of the posted ones
            while True:
                while nxt < len(plan.buckets):
                    bucket, target, buffer = plan.buckets[nxt], landing[nxt], None
                    if in_flight_full(len(posted), held, bucket.nbytes, plan.window_nbytes, self._depth):
                        break
                    if target is not None:
                        data = _as_bytes(target)
                    elif targets is None:
                        data = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.wire_device)
                    elif free:
                        buffer = free.pop()
                        data = buffer[:bucket.nbytes]
                    else:  # every staging buffer holds a posted bucket (so `posted` is not empty)
                        break
                    posted.append((bucket, data, buffer, self._start(what, data)))
                    held += bucket.nbytes
                    nxt += 1
                if not posted:
                    break
                bucket, data, buffer, work = posted.popleft()
                held -= bucket.nbytes
                self._finish(what, work)
                for slot in bucket.slots:
                    view = data[slot.offset: slot.offset + slot.nbytes].view(slot.dtype)
                    yield slot.name, view.view(slot.shape)
                del data  # the consumer may keep its tensors; we do not
                if buffer is not None:
                    free.append(buffer)
        except BaseException as e:  # includes GeneratorExit: an abandoned stream
            self._abandon(f"receive of version {version} stopped: {e!r}")
            raise

    def _landing(self, bucket: Bucket, targets: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
        """The consumer's own tensor this bucket can be received straight into, if any."""
        if targets is None or not bucket.alone:
            return None
        slot = bucket.slots[0]
        target = targets.get(slot.name)
        if (target is None or tuple(target.shape) != slot.shape or target.dtype != slot.dtype
                or target.device != self.wire_device or not target.is_contiguous()):
            return None
        return target


class WeightStream(Iterator[tuple[str, torch.Tensor]]):
    """What ``WeightReceiver.receive`` returns: ``(name, tensor)`` in plan order.

    Call ``load_into(targets)`` before iterating to have tensors received straight
    into the consumer's own storage where they fit (see the module's Receiving);
    then every yielded tensor must be copied (or found to be its target already)
    before the stream is advanced past its bucket."""

    def __init__(self, receiver: WeightReceiver, plan: SyncPlan, version: int):
        self._receiver, self._plan, self._version = receiver, plan, version
        self._targets: Mapping[str, torch.Tensor] | None = None
        self._gen: Iterator[tuple[str, torch.Tensor]] | None = None

    def load_into(self, targets: Mapping[str, torch.Tensor]) -> None:
        if self._gen is not None:
            raise RuntimeError("load_into must be called before the stream is iterated")
        self._targets = targets

    def __next__(self) -> tuple[str, torch.Tensor]:
        if self._gen is None:
            self._gen = self._receiver._receive(self._plan, self._version, self._targets)
        return next(self._gen)

    def close(self) -> None:
        """Abandon the stream (the receiver is then unusable, as after a timeout)."""
        if self._gen is not None:
            self._gen.close()


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous copy of ``tensor`` (0-d tensors included)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)
