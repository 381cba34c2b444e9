"""One configuration system: typed defaults, then ``--config`` files, then ``--set``.

Precedence (later wins): ``TrainConfig`` (``settings.py``) < the model's config class and its
``train_defaults`` < user YAML files and packaged presets < ``key=value`` overrides. Keys are
RecBole's where RecBole has one. The *type* of each default decides which values are accepted, so
a typo or a string where a number belongs fails here, before any data is read, with a message
that names the key; the config classes then check ranges and combinations.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mlsa4rec.errors import ConfigError
from mlsa4rec.settings import (
    RUN_FACTS,
    ModelConfig,
    TrainConfig,
    as_keys,
    check_run_fact,
    check_value,
    defaults_of,
    help_of,
    key_of,
    parse_interval,
    resolve_settings,
)

__all__ = ["Config", "build_config", "known_keys", "load_yaml_file", "parse_interval", "parse_set", "presets",
           "run_facts"]


def _load_packaged_text(relpath: str) -> str:
    return resources.files("mlsa4rec.configs").joinpath(relpath).read_text(encoding="utf-8")


def overall_defaults() -> dict[str, Any]:
    return defaults_of(TrainConfig)


def _config_class(model: str) -> type:
    from mlsa4rec.models import get_class  # the registry imports the models, which import settings only

    return get_class(model).config_class


def model_defaults(model: str) -> dict[str, Any]:
    """A model's hyperparameters, then its own defaults of run settings."""
    cls = _config_class(model)
    return {**defaults_of(cls), **cls.train_defaults}


def model_hyperparameters(model: str) -> dict[str, Any]:
    """The model's own keys with their defaults (not run settings)."""
    return defaults_of(_config_class(model))


def setting_help(model: str) -> dict[str, str]:
    """One line of help per key of ``known_keys(model)``."""
    return {**help_of(TrainConfig), **help_of(_config_class(model))}


def presets() -> list[str]:
    """Names of the packaged settings files (``--config NAME``), e.g. a paper's released config."""
    folder = resources.files("mlsa4rec.configs").joinpath("presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_yaml_file(path: str | Path, kind: str = "config file", flag: str = "--config") -> dict[str, Any]:
    """A user's YAML file of ``key: value`` lines, or a packaged preset when ``path`` is a bare preset
    name and the file is a config file. ``kind`` and ``flag`` name the file in a refusal as the user
    passed it (a study file, a search space, ...)."""
    is_config = flag == "--config"
    if is_config and not Path(path).is_file() and str(path) in presets():
        return yaml.safe_load(_load_packaged_text(f"presets/{path}.yaml")) or {}
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{kind} {str(path)!r} is a directory; pass a YAML file ({flag})")
    if not path.is_file():
        hint = f", or name a packaged preset ({', '.join(presets())})" if is_config else ""
        raise ConfigError(f"{kind} {str(path)!r} does not exist; check the path ({flag}){hint}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark some editors write is harmless
    except UnicodeDecodeError:
        raise ConfigError(f"{kind} {str(path)!r} is not UTF-8 text; save it as UTF-8 (plain YAML "
                          "key: value lines)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {kind} {str(path)!r}: {exc.strerror or exc}; check that it is a "
                          "readable file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{kind} {str(path)!r} is not valid YAML{_yaml_problem(exc)}; fix that line "
                          "(key: value lines)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {str(path)!r} must hold a mapping of key: value lines")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one clause with the line, so the CLI's error stays one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: {' '.join(str(problem).split())}"


def _sources(files: Iterable[str | Path], overrides: Mapping[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """Each settings layer with the words that name it in an error: a config file, or ``--set``."""
    layers = [(f"config file {str(f)!r}", load_yaml_file(f)) for f in files]
    if overrides:
        layers.append(("--set", dict(overrides)))
    return layers


def run_facts(files: Iterable[str | Path] = (), overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``model`` and ``dataset`` that config files or overrides name (later wins; null lines ignored),
    so that a finished run's config.yaml can stand in for ``--model``/``--dataset``."""
    facts: dict[str, str] = {}
    for _, layer in _sources(files, overrides):
        facts.update({key: str(layer[key]) for key in RUN_FACTS if layer.get(key) is not None})
    return facts


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML (``1e-3``, ``[5,10]``, ``true``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


@dataclass(frozen=True, eq=False)  # equality is the mapping's, as before: the same settings by key
class Config(Mapping[str, Any]):
    """One run's settings, typed and validated: the run's facts (``model``, ``dataset``), the settings
    every model shares (``train``, a ``TrainConfig``) and the model's own (``hyper``, its
    ``config_class``). Code reads attributes: ``config.train.max_seq_length``.

    The read-only mapping view uses the keys of YAML, ``--set`` and ``config.yaml`` (RecBole's, e.g.
    ``config["MAX_ITEM_LIST_LENGTH"]``): it is what a run directory saves and what scripts that
    compare settings by name read.
    """

    model: str
    train: TrainConfig
    hyper: ModelConfig
    dataset: Any = None  # a registered name or a file path; None for a config built without data

    def to_dict(self) -> dict[str, Any]:
        """Every setting by its key: what ``config.yaml`` holds (run facts first)."""
        facts = {"model": self.model, **({"dataset": self.dataset} if self.dataset is not None else {})}
        return {**facts, **as_keys(self.train), **as_keys(self.hyper)}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    @property
    def model_keys(self) -> tuple[str, ...]:
        """The keys of the model's own hyperparameters."""
        return tuple(as_keys(self.hyper))

    def model_kwargs(self) -> dict[str, Any]:
        """The model's hyperparameters, as its ``config_class`` takes them."""
        return {f.name: getattr(self.hyper, f.name) for f in fields(self.hyper)}

    def with_train(self, **changes: Any) -> Config:
        """This config with some shared settings changed (field names), each value checked as a
        ``--set`` of it would be."""
        keys = {f.name: key_of(f) for f in fields(self.train)}
        checked = {name: check_value(keys.get(name, name), value, getattr(self.train, name, None))
                   for name, value in changes.items()}
        return replace(self, train=replace(self.train, **checked))


def build_config(
    model: str,
    files: Iterable[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults, files and overrides for ``model`` and validate every key and value.

    ``extra`` holds run facts that are not tunable settings (``dataset``) and are stored with the
    config so that a run directory is self-describing.
    """
    def run_fact(where: str, key: str, value: Any) -> None:
        check_run_fact(where, key, value, model, (extra or {}).get("dataset"))

    train, hyper = resolve_settings(model, _config_class(model), _sources(files, overrides), run_fact)
    return Config(model, train, hyper, (extra or {}).get("dataset"))


def known_keys(model: str) -> dict[str, Any]:
    """Every accepted key for ``model`` with its default (for ``mlsa4rec models --config``)."""
    return {**overall_defaults(), **model_defaults(model)}
