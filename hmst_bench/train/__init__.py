"""The shared trainer: `train(settings)` (loop.py), the machinery stage runners reuse
(`TrainContext`, context.py), checkpoints (checkpoint.py) and the run directory (rundir.py)."""
