"""Whether a step needs PPO's separate "old log-prob" forward before the update.

PPO's ratio ``pi / pi_old`` compares the policy being trained with the one that
sampled. In the synchronous schedule with one mini-batch and one epoch, the update's
only forward runs on exactly the weights that sampled, so ``pi_old`` equals the
training forward's own log-probs: ratio 1, and the clipped objective's gradient is
``-A * grad log pi`` whether ``pi_old`` comes from a separate no-grad pass or from the
training forward detached. The separate pass (a full forward over the batch) can then
be skipped, as TRL's GRPOTrainer does; the loss takes ``old_logprobs=None`` to mean
"the detached current log-probs" (``rlpost.algorithms.loss_fn``).

Decided here, once, from the config; the controller asks and the step line shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.algorithms.registry import make_algorithm


@dataclass(frozen=True)
class OldLogprobPlan:
    separate_pass: bool  # True: forward_logprobs before the update; False: reuse the training forward
    reason: str  # why, for the start message

    def describe(self) -> str:
        how = "separate forward pass" if self.separate_pass else "reused from the training forward (ratio 1)"
        return f"old log-probs: {how}; {self.reason}"


def old_logprob_plan(algo, trainer) -> OldLogprobPlan:
    """``algo``: ``AlgorithmConfig``; ``trainer``: ``TrainerConfig``. The first rule that
    needs the pre-update log-probs keeps the pass: the schedule's, then the
    algorithm's own (``Algorithm.old_logprobs_reason``)."""
    if trainer.mode != "sync":
        return OldLogprobPlan(True, f"trainer.mode={trainer.mode} trains on samples of an older policy")
    if trainer.mini_batches > 1 or trainer.epochs > 1:
        return OldLogprobPlan(True, f"trainer.mini_batches={trainer.mini_batches}, trainer.epochs={trainer.epochs}: "
                                    "later updates need the policy from before the first")
    reason = make_algorithm(algo).old_logprobs_reason()
    if reason is not None:
        return OldLogprobPlan(True, reason)
    return OldLogprobPlan(False, "exactly on-policy: trainer.mode=sync, one mini-batch, one epoch")
