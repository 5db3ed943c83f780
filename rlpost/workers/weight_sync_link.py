"""Driver-side handle of the weight-sync group: trainer rank 0 -> every rollout
replica over a dedicated collective (see ``rlpost.weight_sync`` for the wire
contract).

``push(version)`` is the only thing the controller calls. It returns when every
replica has loaded the weights and serves ``version``; it raises ``WorkerError`` if
that does not happen within ``weight_sync.timeout_s`` instead of hanging.
"""

from __future__ import annotations

from rlpost.errors import WorkerError
from rlpost.workers.cluster import wait
from rlpost.workers.rollout_group import RolloutGroup
from rlpost.workers.trainer_group import TrainerGroup


class WeightSyncLink:
    def __init__(self, trainer: TrainerGroup, rollout: RolloutGroup, timeout_s: float):
        self.trainer, self.rollout, self.timeout_s = trainer, rollout, timeout_s
        world = 1 + rollout.size
        host, port = trainer.weight_sync_init(world)
        refs = [trainer.weight_sync_connect(), *rollout.weight_sync_connect(host, port, world)]
        wait(refs, timeout_s, "weight sync connect")

    def push(self, version: int) -> None:
        plan = self.trainer.weight_plan()
        sends = self.trainer.send_weights(version)
        receives = self.rollout.receive_weights(plan, version)
        served = wait(sends + receives, self.timeout_s, f"weight sync of version {version}")[len(sends):]
        stale = [i for i, v in enumerate(served) if v != version]
        if stale:
            raise WorkerError(f"weight sync of version {version}: replicas {stale} serve versions "
                              f"{[served[i] for i in stale]} after loading; their engine did not take the weights")
