"""The error tree users can catch.

    RlpostError
    ├── ConfigError        a config key, type or value is wrong; the message names it
    ├── DataError          a dataset cannot be loaded (bad rows are skipped, not raised)
    ├── ModelError         a model path/hub id cannot be resolved or loaded
    ├── RewardError        a reward function is unusable as a whole (not one bad sample)
    ├── TrainingError      the update itself failed (NaN loss, diverged)
    └── WorkerError        a Ray actor died or a collective timed out
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
