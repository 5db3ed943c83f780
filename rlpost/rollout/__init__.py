"""Rollouts on the driver side: drawing and scoring a step's samples (``collect``),
multi-turn episodes against environments (``multiturn``), held-out evaluation
(``evaluation``), and the producer thread that samples ahead of the trainer in
``trainer.mode=one_step_off|async`` (``overlap``). The engines that generate are in
``rlpost.engines``; the Ray actors that host them in ``rlpost.workers``."""
