"""Training: the loop, and the run directory around it."""

from mlsa4rec.training.trainer import FitResult, Trainer, set_seed

__all__ = ["FitResult", "Trainer", "set_seed"]
