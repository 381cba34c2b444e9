"""The model registry: ``create(name, n_items, **overrides)`` builds any registered model.

A model declares its hyperparameters, with their defaults, help and checks, in a ``ModelConfig``
dataclass (``config_class``) beside it. Adding a model is one new file in this package and one
import line at the bottom of this module; a model defined elsewhere (a test's toy) needs only
``register``.
"""

from mlsa4rec.models.registry import available, build_model, create, get_class, register

__all__ = ["available", "build_model", "create", "get_class", "register"]

# --- registered models: one import line each -------------------------------------------------
from mlsa4rec.models import (  # noqa: E402,F401,I001 (after the registry they fill)
    bert4rec,
    gru4rec,
    lightsans,
    linrec,
    lrurec,
    mamba4rec,
    mlsa4rec,
    performer,
    sasrec,
)
