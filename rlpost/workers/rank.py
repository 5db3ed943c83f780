"""What a trainer rank and a critic rank share: one member of a data-parallel
torch.distributed group hosted in a Ray actor (``TrainerActor``, ``CriticActor``).

Start-up is the same chain for both groups: ``device`` (what Ray assigned; raises
for a GPU without CUDA), ``rendezvous`` on rank 0 (address and free port), then the
subclass's ``setup``, which calls ``join_group`` before building its engine.
Checkpoints: the subclass's engine saves into the folder, then the rank's RNG
state is written next to it, so a resumed run draws the same numbers.
"""

from __future__ import annotations

import os

import torch

from rlpost.config.schema import RunConfig
from rlpost.workers.cluster import free_port, node_ip, quiet_actor_logs
from rlpost.workers.placement import actor_device, backend_for


class DataParallelRank:
    role = "rank"  # said in errors: "trainer rank 0", "critic rank 1"

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        quiet_actor_logs()

    def pid(self) -> int:
        """The actor's process id (operators and fault-injection tests kill it by pid)."""
        return os.getpid()

    def device(self) -> str:
        """The device Ray assigned this rank (raises, naming the node, for a GPU without CUDA)."""
        self._device = actor_device(f"{self.role} rank {self.rank}")
        return str(self._device)

    def rendezvous(self) -> tuple[str, int]:
        """Address and free port for the group's torch.distributed store (rank 0 only)."""
        host = node_ip()
        return host, free_port(host)

    def join_group(self, cfg: RunConfig, master: tuple[str, int]) -> None:
        from rlpost.distributed import init_default_group

        # FSDP/transformers read these; the group itself is built from an explicit store.
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        # The backend follows the device Ray gave the ranks, not whether CUDA is visible:
        # a CPU rank on a GPU node sees every GPU.
        init_default_group(master[0], master[1], self.rank, self.world_size, backend=backend_for(self._device))
        torch.set_num_threads(cfg.trainer.threads or 1)  # resolved by rlpost.threads in rlpost.train
        torch.manual_seed(cfg.seed)

    def _engine(self):
        raise NotImplementedError

    def save(self, path: str) -> None:
        from rlpost.utils import rng

        self._engine().save(path)
        rng.save(os.path.join(path, f"rng_rank{self.rank}.pt"))  # after the engine made the folder

    def load(self, path: str) -> None:
        from rlpost.utils import rng

        self._engine().load(path)
        rng.load(os.path.join(path, f"rng_rank{self.rank}.pt"))

    def shutdown(self) -> None:
        from rlpost.distributed import destroy_default_group

        destroy_default_group()
