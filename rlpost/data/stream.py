"""An endless, resumable stream of prompt batches over a list of samples.

Each epoch is a permutation drawn from ``(seed, epoch)`` alone, so the position
``(epoch, offset)`` is all a checkpoint needs to continue exactly: no sample is
skipped or repeated across a resume, at an epoch boundary or not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlpost.types import PromptSample


@dataclass
class StreamState:
    epoch: int = 0
    offset: int = 0  # samples of this epoch already handed out


class PromptStream:
    def __init__(self, samples: list[PromptSample], batch_size: int, seed: int, shuffle: bool = True):
        if not samples:
            raise ValueError("the training set is empty after filtering")
        self.samples, self.batch_size, self.seed, self.shuffle = samples, batch_size, seed, shuffle
        self.state = StreamState()
        self._order_epoch, self._order = -1, []

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            order = list(range(len(self.samples)))
            if self.shuffle:
                random.Random(f"{self.seed}-{epoch}").shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def next_batch(self) -> list[PromptSample]:
        """``batch_size`` samples; a batch may span the end of one epoch and the start
        of the next."""
        batch = []
        while len(batch) < self.batch_size:
            order = self._order_for(self.state.epoch)
            take = min(self.batch_size - len(batch), len(order) - self.state.offset)
            batch += [self.samples[i] for i in order[self.state.offset : self.state.offset + take]]
            self.state.offset += take
            if self.state.offset == len(order):
                self.state = StreamState(self.state.epoch + 1, 0)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "offset": self.state.offset, "num_samples": len(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != len(self.samples):
            raise ValueError(
                f"checkpoint was taken over {state['num_samples']} training samples, this run has "
                f"{len(self.samples)}: the data changed, so the position cannot be restored"
            )
        self.state = StreamState(state["epoch"], state["offset"])
