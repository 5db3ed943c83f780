"""The error tree users can catch.

    RlpostError
    ├── ConfigError        a config key, type or value is wrong; the message names it
    ├── DataError          a dataset cannot be loaded (bad rows are skipped, not raised)
    ├── ModelError         a model path/hub id cannot be resolved or loaded
    ├── RewardError        a reward function is unusable as a whole (not one bad sample)
    ├── TrainingError      the update itself failed (NaN loss, diverged)
    ├── WorkerError        a Ray actor died or a collective timed out
    │   └── TrainerLost    a trainer rank died; the supervisor rebuilds the group
    ├── SandboxError       the code sandbox service is unreachable, overloaded past the
    │                      client's retries, refused a request, or cannot isolate code
    └── Preempted          SIGTERM or a first Ctrl-C arrived; a checkpoint was written (exit code 75)
"""


class RlpostError(Exception):
    """Base class of every error rlpost raises on purpose."""


class ConfigError(RlpostError):
    pass


class DataError(RlpostError):
    pass


class ModelError(RlpostError):
    pass


class RewardError(RlpostError):
    pass


class TrainingError(RlpostError):
    pass


class WorkerError(RlpostError):
    pass


class TrainerLost(WorkerError):
    """A trainer rank died (or stopped answering), so the whole trainer group is
    unusable. ``rlpost.step.supervisor`` catches it and rebuilds the group from the latest
    checkpoint, up to ``trainer.max_restarts`` times."""


class SandboxError(RlpostError):
    """Infrastructure failure of the code sandbox, never the sandboxed program's own
    failure: a program that times out or crashes is a ``RunResult``, not an exception."""


class Preempted(RlpostError):
    """The run was asked to stop (SIGTERM: Slurm preemption, Kubernetes eviction; or Ctrl-C). The
    step in flight was finished and checkpointed; ``resume=auto`` continues it."""

    exit_code = 75  # EX_TEMPFAIL: "try again", what schedulers' requeue logic expects

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step} on request; checkpoint written, resume with resume=auto")
        self.step = step
