"""The error tree users can catch.

    RlpostError
    ├── ConfigError        a config key, type or value is wrong; the message names it
    ├── DataError          a dataset cannot be loaded (bad rows are skipped, not raised)
    ├── ModelError         a model path/hub id cannot be resolved or loaded
    ├── RewardError        a reward function is unusable as a whole (not one bad sample)
    ├── TrainingError      the update itself failed (NaN loss, diverged)
    ├── WorkerError        a Ray actor died or a collective timed out
    └── Preempted          SIGTERM arrived; a checkpoint was written (exit code 75)
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


class Preempted(RlpostError):
    """The run was asked to stop (SIGTERM: Slurm preemption, Kubernetes eviction). The
    step in flight was finished and checkpointed; ``resume=auto`` continues it."""

    exit_code = 75  # EX_TEMPFAIL: "try again", what schedulers' requeue logic expects

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step} on request; checkpoint written, resume with resume=auto")
        self.step = step
