"""One configuration system: packaged YAML defaults, then ``--config`` files, then ``--set``.

Precedence (later wins): ``configs/overall.yaml`` < ``configs/models/<model>.yaml`` < user YAML
files < ``key=value`` overrides. Keys are RecBole's where RecBole has one. The *type* of each
default decides which values are accepted, so a typo or a string where a number belongs fails
here, before any data is read, with a message that names the key.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mlsa4rec.errors import ConfigError, MLSA4RecError, check_choice
from mlsa4rec.metrics import METRICS, parse_metric

TRAIN_SCHEMES = ("auto", "prefix", "all_positions", "cloze")
LR_SCHEDULERS = ("constant", "cosine", "linear")
_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*$")


def _load_packaged_text(relpath: str) -> str:
    return resources.files("mlsa4rec.configs").joinpath(relpath).read_text(encoding="utf-8")


def _load_packaged(relpath: str) -> dict[str, Any]:
    return yaml.safe_load(_load_packaged_text(relpath)) or {}


def overall_defaults() -> dict[str, Any]:
    return _load_packaged("overall.yaml")


def model_defaults(model: str) -> dict[str, Any]:
    """The packaged YAML of one model (hyperparameters plus overrides of overall keys)."""
    try:
        return _load_packaged(f"models/{model}.yaml")
    except FileNotFoundError:
        raise ConfigError(f"model {model!r} has no packaged defaults (configs/models/{model}.yaml)") from None


def model_hyperparameters(model: str) -> dict[str, Any]:
    """The keys of a model's YAML that are its own (not overrides of overall settings)."""
    overall = overall_defaults()
    return {k: v for k, v in model_defaults(model).items() if k not in overall}


def presets() -> list[str]:
    """Names of the packaged settings files (``--config NAME``), e.g. a paper's released config."""
    folder = resources.files("mlsa4rec.configs").joinpath("presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """A user's YAML file, or a packaged preset when ``path`` is a bare preset name."""
    if not Path(path).is_file() and str(path) in presets():
        return yaml.safe_load(_load_packaged_text(f"presets/{path}.yaml")) or {}
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; pass a YAML file of settings to --config")
    if not path.is_file():
        names = ", ".join(presets())
        raise ConfigError(f"config file {str(path)!r} does not exist; check the --config path, or name a "
                          f"packaged preset ({names})")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark some editors write is harmless
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; save it as UTF-8 (plain YAML "
                          "key: value lines)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}; check that it is a "
                          "readable file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{_yaml_problem(exc)}; fix that line "
                          "(settings are key: value lines)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of key: value lines")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one clause with the line, so the CLI's error stays one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: {' '.join(str(problem).split())}"


RUN_FACTS = ("model", "dataset")


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


def _same_dataset(given: str, resolved: str) -> bool:
    """A saved config.yaml holds the resolved absolute path (or a registered name); a user may write
    the path as given on the command line, so two names of one existing file are the same dataset."""
    if given == resolved:
        return True
    a, b = Path(given).expanduser(), Path(resolved).expanduser()
    return a.is_file() and b.is_file() and a.resolve() == b.resolve()


def _check_run_fact(where: str, key: str, value: Any, model: str, extra: Mapping[str, Any] | None) -> None:
    """Refuse a ``model``/``dataset`` line that contradicts what the command runs, instead of ignoring it."""
    if value is None:
        return
    given = str(value)
    shown = given if given.isprintable() and given.split() == [given] else repr(given)  # keep the error one line
    said, line = (f"--set {key}={shown}", "it") if where == "--set" else (f"{where} sets {key}: {shown}", "the line")
    if key == "model" and given != model:
        raise ConfigError(f"{said} but the command trains {model!r}; remove {line} or pass --model {shown}")
    if key == "dataset" and extra and extra.get("dataset") is not None and \
            not _same_dataset(given, str(extra["dataset"])):
        raise ConfigError(f"{said} but the command trains on {str(extra['dataset'])!r}; remove {line} or pass "
                          f"--dataset {shown}")


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


def parse_interval(text: str, key: str = "interval") -> tuple[float, float]:
    """RecBole's ``"[5,inf)"`` notation, as inclusive integer bounds ``(5, inf)``."""
    m = _INTERVAL.match(str(text))
    if not m:
        raise ConfigError(f"{key}: {text!r} is not an interval like \"[5,inf)\"")
    lo_b, lo_s, hi_s, hi_b = m.groups()
    try:
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not an interval like \"[5,inf)\"") from None
    if math.isnan(lo) or math.isnan(hi):
        raise ConfigError(f"{key}: {text!r} is not an interval like \"[5,inf)\"")
    lo = lo if lo_b == "[" or math.isinf(lo) else math.floor(lo) + 1
    hi = hi if hi_b == "]" or math.isinf(hi) else math.ceil(hi) - 1
    if lo > hi:
        raise ConfigError(f"{key}: {text!r} is empty")
    return lo, hi


def _number(key: str, value: Any, want: type, default: Any) -> int | float:
    """``value`` as an int or float setting: any spelling float() reads ("1e-3", "1_000", " 2 "; PyYAML,
    following YAML 1.1, leaves 1e-3 a string), integral for int settings, and finite."""
    number: int | float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value)  # exact for big integers, which a float would round
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                pass
    if number is None:
        raise ConfigError(f"{key}: expected {want.__name__}, got {value!r} ({type(value).__name__}); write a "
                          f"number like {default!r}")
    if isinstance(number, float) and not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {number}; write a number like {default!r}")
    if want is float:
        try:
            return float(number)
        except OverflowError:  # an int beyond float's range
            raise ConfigError(f"{key} must be a finite number, got {value!r}; write a number like "
                              f"{default!r}") from None
    if isinstance(number, float):
        if not number.is_integer():
            raise ConfigError(f"{key}: expected int, got {value!r} ({type(value).__name__}); write a whole "
                              f"number like {default!r}")
        return int(number)
    return number


def _check_type(key: str, value: Any, default: Any) -> Any:
    """Coerce ``value`` to the type of ``default`` where that is lossless, else raise."""
    if default is None:
        return value
    if value is None:
        raise ConfigError(f"{key}: a value is required (got null)")
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want in (int, float):
        return _number(key, value, want, default)
    elif want is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif want is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        return [value]
    else:
        return value
    raise ConfigError(f"{key}: expected {want.__name__}, got {value!r} ({type(value).__name__})")


def _unknown_key(key: str, known: Iterable[str], model: str | None) -> ConfigError:
    close = difflib.get_close_matches(str(key), list(known), n=1)  # YAML keys may be ints or bools
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f" for model {model!r}" if model else ""
    listing = f"`mlsa4rec models --config {model or 'sasrec'}` lists them"
    return ConfigError(f"unknown config key {key!r}{where}{hint} ({listing})")


class Config(Mapping[str, Any]):
    """A validated, read-only mapping of every setting of one run."""

    def __init__(self, values: Mapping[str, Any], model_keys: Iterable[str] = ()) -> None:
        self._values = dict(values)
        self.model_keys = tuple(model_keys)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def model_kwargs(self) -> dict[str, Any]:
        return {k: self._values[k] for k in self.model_keys}


def build_config(
    model: str,
    files: Iterable[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults, files and overrides for ``model`` and validate every key and value.

    ``extra`` holds run facts that are not tunable settings (``model``, ``dataset``) and are
    stored with the config so that a run directory is self-describing.
    """
    base = overall_defaults()
    own = model_defaults(model)
    defaults = {**base, **own}
    values = dict(defaults)
    for where, layer in _sources(files, overrides):
        for key, value in layer.items():
            if key in RUN_FACTS:  # a saved config.yaml holds them: fine when they agree with the command
                _check_run_fact(where, key, value, model, extra)
                continue
            if key not in defaults:
                raise _unknown_key(key, defaults, model)
            values[key] = _check_type(key, value, defaults[key])
    _validate(values)
    values = {"model": model, **(dict(extra) if extra else {}), **values}
    model_keys = [k for k in own if k not in base]
    return Config(values, model_keys)


def _validate(v: dict[str, Any]) -> None:
    def positive(key: str) -> None:
        if not v[key] > 0:
            raise ConfigError(f"{key} must be > 0, got {v[key]!r}")

    for key in ("epochs", "train_batch_size", "eval_batch_size", "MAX_ITEM_LIST_LENGTH", "eval_step",
                "learning_rate", "dist_timeout"):
        positive(key)
    for key in ("weight_decay", "clip_grad_norm", "stopping_step", "all_positions_stride", "checkpoint_steps"):
        if v[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {v[key]!r}")
    if not 0 <= v["seed"] < 2 ** 32:  # the range every generator seeded from it (numpy's) accepts
        raise ConfigError(f"seed must be in [0, 2**32), got {v['seed']!r}")
    for key in ("user_inter_num_interval", "item_inter_num_interval"):
        parse_interval(v[key], key)
    check_choice("train_scheme", v["train_scheme"], TRAIN_SCHEMES, ConfigError)
    check_choice("lr_scheduler", v["lr_scheduler"], LR_SCHEDULERS, ConfigError)
    if str(v["loss_type"]).upper() != "CE":
        raise ConfigError(f"loss_type {v['loss_type']!r} is not offered; only CE (full softmax) is")
    metrics = [str(m).lower() for m in v["metrics"]]
    for m in metrics:
        if m not in METRICS:
            raise ConfigError(f"metrics: unknown metric {m!r}; choose from {', '.join(METRICS)}")
    v["metrics"] = metrics
    topk = v["topk"]
    if not topk or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in topk):
        raise ConfigError(f"topk must be a list of positive integers, got {topk!r}")
    v["topk"] = sorted(set(topk))
    try:
        name, k = parse_metric(str(v["valid_metric"]))
    except MLSA4RecError:
        name, k = "", 0
    if name not in metrics or k not in v["topk"]:
        raise ConfigError(
            f"valid_metric {v['valid_metric']!r} is not computed: it must be METRIC@K with METRIC in "
            f"metrics {metrics} and K in topk {v['topk']}"
        )
    v["valid_metric"] = f"{name}@{k}"
    for key, value in v.items():
        if key.endswith("dropout_prob") and not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(v["device"])):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {v['device']!r}")


def known_keys(model: str) -> dict[str, Any]:
    """Every accepted key for ``model`` with its default (for ``mlsa4rec models --config``)."""
    return {**overall_defaults(), **model_defaults(model)}
