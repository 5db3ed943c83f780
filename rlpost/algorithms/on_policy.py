"""Whether a step needs PPO's separate "old log-prob" forward before the update.

PPO's ratio ``pi / pi_old`` compares the policy being trained with the trainer's policy
from before the update (the "proximal" policy of decoupled PPO). With one mini-batch and
one epoch the update's only forward runs on exactly those weights, in every schedule:
``pi_old`` equals the training forward's own log-probs, the ratio is 1, and the clipped
objective's gradient is ``-A * grad log pi`` whether ``pi_old`` comes from a separate
no-grad pass or from the training forward detached. The separate pass (a full forward
over the batch) can then be skipped, as TRL's GRPOTrainer does; the loss takes
``old_logprobs=None`` to mean "the detached current log-probs"
(``rlpost.algorithms.loss_fn``).

That holds in ``trainer.mode=one_step_off|async`` too: their samples come from an older
policy, but the separate pass would not see that policy either (it runs on the trainer's
current weights). What the sampler's policy gave is ``rollout_logprobs``, recorded at
sampling time, which the off-policy corrections (``algorithm.tis_cap``,
``algorithm.off_policy``) weigh against the same detached current log-probs inside the
loss. The pass stays where a value is needed before the update: later mini-batches or
epochs, the KL shaped into the reward, and the critic's warm-up (``Algorithm.old_logprobs_reason``).

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
    if trainer.mini_batches > 1 or trainer.epochs > 1:
        return OldLogprobPlan(True, f"trainer.mini_batches={trainer.mini_batches}, trainer.epochs={trainer.epochs}: "
                                    "later updates need the policy from before the first")
    reason = make_algorithm(algo).old_logprobs_reason()
    if reason is not None:
        return OldLogprobPlan(True, reason)
    if trainer.mode == "sync":
        return OldLogprobPlan(False, "exactly on-policy: trainer.mode=sync, one mini-batch, one epoch")
    return OldLogprobPlan(False, f"one mini-batch, one epoch: the update's forward runs on the weights a pass would "
                                 f"read (trainer.mode={trainer.mode}'s older sampler is rollout_logprobs)")
