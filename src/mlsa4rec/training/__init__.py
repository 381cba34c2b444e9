"""Training: the loop, its losses and the distributed glue; a run's directory is ``mlsa4rec.runs``."""

from mlsa4rec.runtime import set_seed
from mlsa4rec.training.trainer import FitResult, Trainer

__all__ = ["FitResult", "Trainer", "set_seed"]
