"""Counts of infrastructure failures a run survived, logged with every step.

The Ray groups and the trainer supervisor add to one shared ``FaultCounts``; the
controller merges ``metrics()`` into each step's metrics, so ``metrics.jsonl``
shows when a replica was restarted or the trainer rebuilt. Counts are cumulative
over the life of the training process (a resumed run starts again from zero).
"""

from __future__ import annotations


class FaultCounts:
    KEYS = (
        "rollout/actor_restarts",  # rollout replicas replaced after dying
        "rollout/requests_retried",  # generate chunks re-run on a replacement replica
        "reward/actor_restarts",  # reward workers replaced after dying
        "env/actor_failures",  # env actor calls lost to a dead or hung actor (Ray restarts it)
        "trainer/restarts",  # trainer group rebuilt from the latest checkpoint
    )

    def __init__(self):
        self.counts = dict.fromkeys(self.KEYS, 0)

    def add(self, key: str, n: int = 1) -> None:
        if key not in self.counts:
            raise KeyError(f"unknown fault counter {key!r}; known: {', '.join(self.KEYS)}")
        self.counts[key] += n

    def metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in self.counts.items()}
