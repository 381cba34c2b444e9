"""The registry of models: a model class registers itself under its name (``@register``);
``create(name, n_items, **overrides)`` builds any registered model. ``mlsa4rec.models`` imports
every model file, so that importing it fills the registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlsa4rec.errors import ConfigError
from mlsa4rec.settings import check_run_fact, resolve_settings

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_class(name: str) -> type:
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name.lower(), available(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint} (registered: {', '.join(available())})")
    return _REGISTRY[name]


def create(name: str, n_items: int, **overrides: Any):
    """Build model ``name`` for ``n_items`` real items (id 0 is padding).

    ``overrides`` may be any of the model's hyperparameters, or ``MAX_ITEM_LIST_LENGTH``; an
    unknown key raises ``ConfigError`` naming it.
    """
    cls = get_class(name)
    def run_fact(where: str, key: str, value: Any) -> None:  # model=... must be this model
        check_run_fact(where, key, value, name)

    train, hyper = resolve_settings(name, cls.config_class, [("--set", overrides)], run_fact)
    return build_model(cls, n_items, vars(hyper), train.max_seq_length)


def build_model(cls: type, n_items: int, kwargs: dict[str, Any], max_seq_length: int):
    """``cls`` for ``n_items`` items and histories of ``max_seq_length``, its hyperparameters ``kwargs``."""
    try:
        return cls(n_items, max_seq_length, cls.config_class(**kwargs))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot build model {cls.name!r}: {exc}") from None
