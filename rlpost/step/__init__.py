"""The training step and its driver: the ``Controller`` (one step, stage by stage, and
its tail), PPO's critic stages, building train batches from trajectories, per-phase
timings, and the ``Supervisor`` that restarts a run from its last checkpoint."""
