"""Colocated placement on GPUs: trainer rank i and rollout replica i share GPU i.

GPU-only; nothing here runs on CPU, and its tests are marked ``gpu``. What it adds to
the disaggregated path (``rlpost.sync.transport``, the default and the only one on CPU):

- **Memory phases.** vLLM runs with ``enable_sleep_mode``: before the trainer computes,
  the replica sleeps (level 1: weights offloaded to host memory, KV cache freed); for
  a weight update it wakes its weights only, then its KV cache once the new weights
  are in. ``MemoryPhases`` is the small state machine the driver-side groups share so
  every transition happens exactly once, whoever asks for it.
- **Weights by CUDA IPC, through vLLM's own weight-transfer engine.** The replica's
  engine is built with ``weight_transfer_config={"backend": "ipc"}``; every trainer
  rank runs vLLM's ``IPCTrainerWeightTransferEngine`` over an ``EngineWeightSource``
  (the FSDP engine's full tensors, gathered one at a time on the GPU), the ranks
  all-gather their IPC handles over the trainer's default group, and rank 0 ships the
  merged handles through a ``VLLMWeightSyncClient``: four control-plane calls that the
  Ray layer (``rlpost.workers.colocation``) forwards to every replica. Each replica
  opens the handle of its own GPU, so no byte crosses PCIe or the network.
  ``packed=True`` moves the weights through one reused staging buffer of
  ``bucket_bytes``, so the trainer's peak extra memory is one bucket, as on the
  broadcast path.

Contract of one colocated sync to version v: the driver calls ``wake_weights`` on every
replica, then ``send`` on every trainer rank concurrently (a collective over the
trainer group), which ends with each replica's ``finish_weight_update(v)``; then
``wake_kv_cache``. A replica serves version v from then on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rlpost.engines.base import TrainEngine
from rlpost.errors import ConfigError


def require_gpus(what: str = "rollout.colocate=true") -> None:
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} shares GPUs between the trainer and vLLM (sleep mode, CUDA IPC), "
                          "and this process sees no CUDA device. On CPU leave rollout.colocate=false: "
                          "trainer and rollout run side by side and weights go over gloo.")


def engine_weight_source(engine: TrainEngine):
    """vLLM ``WeightSource`` over a rlpost training engine (FSDP2 or DeepSpeed).

    ``metadata()`` comes from ``named_weight_shapes()`` (local, no gather) and iteration
    from ``named_full_weights()`` (collective: every trainer rank iterates in lockstep,
    one full tensor alive at a time), which is what vLLM's trainer engines expect.
    """
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class EngineWeightSource(WeightSource):
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(name, dtype, tuple(shape)) for name, shape, dtype in engine.named_weight_shapes()]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            return iter(engine.named_full_weights())

    return EngineWeightSource()


def ipc_sender(engine: TrainEngine, rank: int, client, bucket_bytes: int):
    """vLLM's trainer-side CUDA IPC engine for trainer ``rank``; ``client`` implements
    vLLM's ``VLLMWeightSyncClient`` (only rank 0's is used). Rank 0 also initialises
    the replicas' receiving engines (``init_weight_transfer_engine``)."""
    require_gpus()
    from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine

    info = IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=bucket_bytes)
    return IPCTrainerWeightTransferEngine.trainer_init(info, client=client, source=engine_weight_source(engine))


class MemoryPhases:
    """Which of trainer and rollout may hold GPU memory right now; shared by the
    driver-side groups. ``sleep``/``wake`` are callables over every replica.

    States: ``rollout`` (vLLM awake, the start state), ``train`` (vLLM asleep).
    ``to_train()`` before any trainer compute; ``to_rollout()`` before generating.
    ``sync(send)`` wakes weights only, runs ``send()``, then wakes the KV cache: the
    weight update never has a KV cache and a training step's activations on the GPU
    at the same time.
    """

    def __init__(self, sleep, wake):
        self._sleep, self._wake = sleep, wake
        self.state = "rollout"

    def to_train(self) -> None:
        if self.state != "train":
            self._sleep()
            self.state = "train"

    def to_rollout(self) -> None:
        if self.state != "rollout":
            self._wake(None)
            self.state = "rollout"

    def sync(self, send) -> None:
        if self.state == "train":
            self._wake(["weights"])
        send()
        if self.state == "train":
            self._wake(["kv_cache"])
        self.state = "rollout"
