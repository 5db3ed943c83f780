"""Weight sync: trainer rank 0 -> rollout replicas, bucketed and versioned.

Weights travel over a dedicated process group, never through the Ray object store
and never through the trainer's own group: rank 0 is trainer rank 0 (the sender),
ranks 1..R are the R rollout replicas (receivers). On CPU it is gloo; on GPU it is
NCCL. The group is built from its own ``TCPStore`` on a port the driver picks.

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
   picklable layout. The driver hands the same plan to every rank through Ray.
2. Concurrently, with the same ``version`` everywhere:
   - trainer rank 0: ``sender.send(engine.named_full_weights(), plan, v)``;
   - other trainer ranks: drain ``engine.named_full_weights()`` (it is collective);
   - replica r: ``engine.update_weights(receiver.receive(plan, v), v)``.
3. Every rank first joins a handshake that compares versions and plan layouts; on
   any mismatch *every* rank raises ``WorkerError`` and nothing is sent (the group
   stays usable).
   Then buckets are broadcast in plan order. The sender waits for each broadcast
   to complete before filling the next bucket; a receiver waits for each bucket,
   then yields its tensors.

Versions. The sync layer holds no version itself: a replica holds version v once
``update_weights`` has consumed the whole ``receive(plan)`` iterator; until then it
still holds the previous version (the caller must not generate mid-sync). The
trainer's weights are version v as soon as ``send`` is called.

Memory. Peak extra memory is about one bucket on every rank (a tensor larger than
``bucket_mb`` travels alone, zero-copy on the sender). Tensors are yielded as views
into a fresh per-bucket buffer, so a consumer may keep them; if it copies and drops
them, memory stays at one bucket.

Failure. Any collective that does not finish within ``timeout_s`` (a dead replica,
a sender that never sends, an unconsumed ``receive`` iterator) raises
``WorkerError``; the sender and receivers are then unusable and must be re-created
on a fresh port. If ``send`` fails part-way it still drains the weight iterator, so
the trainer's own collective in ``named_full_weights`` stays in step on all ranks.
On NCCL a timeout is enforced by the NCCL watchdog, which by default tears the
process down rather than raising (GPU path, not tested on CPU CI).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import torch
import torch.distributed as dist

from rlpost.distributed import store_on
from rlpost.errors import WorkerError

_ALIGN = 64  # byte alignment of tensors inside a bucket (any dtype can view there)
_LOOPBACK = ("127.0.0.1", "localhost")


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


@dataclass(frozen=True)
class SyncPlan:
    """Layout of a sync: tensors in send order, packed into byte buckets. Holds no
    version; the same plan serves every sync while names and shapes stay put."""

    buckets: tuple[Bucket, ...]

    @cached_property
    def fingerprint(self) -> int:
        """62-bit hash of the layout; equal plans have equal prints on every host."""
        text = repr([(s.name, s.shape, str(s.dtype), s.offset) for b in self.buckets for s in b.slots])
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2

    @property
    def num_tensors(self) -> int:
        return sum(len(b.slots) for b in self.buckets)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)


def make_plan(specs: Iterable[tuple[str, Iterable[int], torch.dtype]], bucket_mb: float = 64) -> SyncPlan:
    """Pack ``(name, shape, dtype)`` in the given order into buckets of at most
    ``bucket_mb`` MiB; dtypes may mix (buckets are bytes). A tensor larger than a
    bucket gets a bucket of its own."""
    limit = int(bucket_mb * 2**20)
    buckets: list[Bucket] = []
    slots: list[TensorSlot] = []
    used = 0
    for name, shape, dtype in specs:
        shape = tuple(int(d) for d in shape)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        offset = -(-used // _ALIGN) * _ALIGN
        if slots and offset + nbytes > limit:
            buckets.append(Bucket(used, tuple(slots)))
            slots, offset = [], 0
        slots.append(TensorSlot(name, shape, dtype, offset, nbytes))
        used = offset + nbytes
    if slots:
        buckets.append(Bucket(used, tuple(slots)))
    return SyncPlan(buckets=tuple(buckets))


class _Channel:
    """A process group of its own (not the default group, not registered with
    torch.distributed) with the two collectives weight sync needs."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.timeout = timedelta(seconds=timeout_s)
        try:
            # TCPStore alone listens on every interface; store_on binds only to host.
            self.store = store_on(host, port, rank, world_size, timeout_s)
            self.pg = self._make_group(host, rank, world_size)
        except (RuntimeError, OSError) as e:  # DistNetworkError/DistStoreError are RuntimeErrors
            self.close()
            raise WorkerError(f"weight sync rank {rank}/{world_size} could not join the group at "
                              f"{host}:{port} within {timeout_s}s: {e}") from e

    def _make_group(self, host: str, rank: int, world_size: int):
        if self.device.type == "cuda":
            # GPU path (untested on CPU CI): a standalone NCCL communicator over our
            # own store, as torch.distributed._dist2's NCCL factory builds one.
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            pg = dist.ProcessGroupNCCL(self.store, rank, world_size, opts)
            pg.eager_connect_single_device(self.device)
            return pg
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = self.timeout
        # On one machine bind gloo's sockets to loopback; otherwise gloo's default
        # device (GLOO_SOCKET_IFNAME or the hostname's address).
        device = (dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if host in _LOOPBACK
                  else dist.ProcessGroupGloo.create_default_device())
        opts._devices = [device]
        return dist.ProcessGroupGloo(self.store, rank, world_size, opts)

    def broadcast(self, tensor: torch.Tensor) -> None:
        self.pg.broadcast(tensor, 0).wait()

    def all_reduce_max(self, tensor: torch.Tensor) -> None:
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.pg.allreduce([tensor], opts).wait()

    def close(self) -> None:
        for name in ("pg", "store"):
            if hasattr(self, name):
                delattr(self, name)


class _Endpoint:
    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float,
                 device: torch.device | str | None):
        if world_size < 2:
            raise ValueError(f"weight sync needs a sender and at least one receiver, got world_size={world_size}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.rank, self.timeout_s = rank, timeout_s
        self._channel: _Channel | None = _Channel(host, port, rank, world_size, timeout_s, device)
        self._broken: str | None = None

    @property
    def device(self) -> torch.device:
        return self._require().device

    def _require(self) -> _Channel:
        if self._channel is None:
            raise WorkerError(f"weight sync rank {self.rank} is closed" + (f" after: {self._broken}" if self._broken else ""))
        return self._channel

    def _collective(self, what: str, fn, tensor: torch.Tensor) -> None:
        channel = self._require()
        try:
            fn(channel, tensor)
        except RuntimeError as e:  # gloo timeouts and peer resets
            self._broken = f"{what} failed: {e}"
            self.close()
            raise WorkerError(f"weight sync rank {self.rank}: {what} did not complete within "
                              f"{self.timeout_s}s (a peer died or never joined): {e}") from e

    def _handshake(self, plan: SyncPlan, version: int) -> None:
        """Every rank contributes (version, layout); all raise unless all agree."""
        v, fp = int(version), plan.fingerprint
        t = torch.tensor([v, -v, fp, -fp], dtype=torch.int64, device=self.device)
        self._collective(f"handshake for version {v}", _Channel.all_reduce_max, t)
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
                for bucket in plan.buckets:
                    self._collective(f"bucket broadcast (version {version})", _Channel.broadcast,
                                     self._pack(bucket, it))
            except BaseException as e:
                self._abandon(f"send of version {version} stopped: {e!r}")
                raise
            leftover = next(it, None)
            if leftover is not None:
                raise WorkerError(f"weight sync: tensor {leftover[0]!r} is not in the plan (version {version})")
        finally:
            for _ in it:  # keep the trainer's collective iterator in step on all ranks
                pass

    def _pack(self, bucket: Bucket, it: Iterator[tuple[str, torch.Tensor]]) -> torch.Tensor:
        buffer = None
        for slot in bucket.slots:
            name, tensor = next(it, (None, None))
            if name != slot.name or tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
                got = "nothing" if name is None else f"{name!r} {tuple(tensor.shape)} {tensor.dtype}"
                raise WorkerError(f"weight sync: plan expects {slot.name!r} {slot.shape} {slot.dtype}, "
                                  f"the weights gave {got}; rebuild the plan from the engine's named_weight_shapes()")
            data = _as_bytes(tensor.to(self.device))
            if len(bucket.slots) == 1:
                return data  # zero-copy for tensors that fill a bucket alone
            if buffer is None:
                buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
            buffer[slot.offset: slot.offset + slot.nbytes].copy_(data)
        return buffer


class WeightReceiver(_Endpoint):
    """Rank ``rank`` (1..R) of the sync group; lives on a rollout replica."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float = 300.0,
                 device: torch.device | str | None = None):
        if not 1 <= rank < world_size:
            raise ValueError(f"receiver rank must be in 1..{world_size - 1}, got {rank}")
        super().__init__(host, port, rank, world_size, timeout_s, device)

    def receive(self, plan: SyncPlan, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` in plan order as buckets arrive. Lazy: nothing
        happens until iteration starts, and it must be iterated to the end."""
        self._handshake(plan, version)
        try:
            for bucket in plan.buckets:
                buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
                self._collective(f"bucket receive (version {version})", _Channel.broadcast, buffer)
                for slot in bucket.slots:
                    view = buffer[slot.offset: slot.offset + slot.nbytes].view(slot.dtype)
                    yield slot.name, view.view(slot.shape)
                del buffer
        except BaseException as e:  # includes GeneratorExit: an abandoned iterator
            self._abandon(f"receive of version {version} stopped: {e!r}")
            raise


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous copy of ``tensor`` (0-d tensors included)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)
