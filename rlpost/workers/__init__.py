"""The only layer that imports Ray. Actors are thin wrappers around an engine or a
reward function; the driver-side groups have typed methods that say whether data is
sharded (``TrainerGroup.train_step``), split (``RolloutGroup.generate``) or
broadcast (weight sync)."""
