"""Every default, declared once: ``TrainConfig`` for a run's settings, a ``ModelConfig`` per model.

A setting is a dataclass field with its default and one line of help (``setting``). The typed
config a run uses (``config.build_config``), the list ``mlsa4rec models --config NAME`` prints and
the values a resumed run falls back to are all read from these classes. Keys (YAML, ``--set``,
``config.yaml``) follow RecBole where RecBole has the setting; a field whose RecBole key is not a
Python name for code (``MAX_ITEM_LIST_LENGTH``) declares it with ``key=`` and is read in code by
its field name (``max_seq_length``).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from mlsa4rec.errors import ConfigError, MLSA4RecError, check_choice
from mlsa4rec.metrics import METRICS, parse_metric

TRAIN_SCHEMES = ("auto", "prefix", "all_positions", "cloze")
LR_SCHEDULERS = ("constant", "cosine", "linear")
DUPLICATE_RULES = ("drop", "keep")  # what happens to events equal to an earlier one (data/dataset.py)
SPLITS = ("leave_one_out", "time")  # how users' events become train/valid/test targets (data/dataset.py)
LOSS_TYPES = ("CE", "sampled_softmax", "gBCE")  # training/losses.py; matched without regard to case
NEGATIVE_SAMPLERS = ("uniform", "popularity", "in_batch")
_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*$")


def setting(default: Any, help: str, key: str | None = None) -> Any:
    """A field with its default and the help line ``mlsa4rec models --config`` prints beside it;
    ``key``: its name in YAML and ``--set`` where that differs from the field's name."""
    metadata = {"help": help, **({"key": key} if key else {})}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def key_of(f: Field) -> str:
    """A field's key in YAML, ``--set`` and ``config.yaml``."""
    return f.metadata.get("key", f.name)


def defaults_of(cls: type) -> dict[str, Any]:
    """{key: default} of a settings dataclass, in declaration order."""
    return {key_of(f): f.default_factory() if f.default is MISSING else f.default for f in fields(cls)}


def help_of(cls: type) -> dict[str, str]:
    return {key_of(f): f.metadata.get("help", "") for f in fields(cls)}


def from_keys(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of the settings class ``cls`` from ``{key: value}`` (its keys, not field names)."""
    return cls(**{f.name: values[key_of(f)] for f in fields(cls) if key_of(f) in values})


def as_keys(settings: Any) -> dict[str, Any]:
    """``{key: value}`` of a settings instance, in declaration order (what ``config.yaml`` holds)."""
    return {key_of(f): getattr(settings, f.name) for f in fields(settings)}


def parse_interval(text: str, key: str = "interval") -> tuple[float, float]:
    """RecBole's ``"[5,inf)"`` notation, as inclusive integer bounds ``(5, inf)``."""
    m = _INTERVAL.match(str(text))
    bad = ConfigError(f"{key}: {text!r} is not an interval like \"[5,inf)\"")
    if not m:
        raise bad
    lo_b, lo_s, hi_s, hi_b = m.groups()
    try:
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        raise bad from None
    if math.isnan(lo) or math.isnan(hi):
        raise bad
    lo = lo if lo_b == "[" or math.isinf(lo) else math.floor(lo) + 1
    hi = hi if hi_b == "]" or math.isinf(hi) else math.ceil(hi) - 1
    if lo > hi:
        raise ConfigError(f"{key}: {text!r} is empty")
    return lo, hi


def parse_time(value: Any, key: str = "time") -> float:
    """A cut-off date as Unix seconds: a number of seconds, or an ISO-8601 date or date-time
    (``2014-01-01``, ``2014-01-01T12:00:00+02:00``; UTC where it names no zone). YAML reads a bare
    date as a ``date`` object and ``--set`` values are YAML, so those are taken too."""
    import datetime as dt

    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, (dt.date, str)):
        when = value
        if isinstance(value, str):
            text = value.strip()
            try:
                seconds = float(text)
            except ValueError:
                try:  # Python 3.10's fromisoformat does not read a trailing Z
                    when = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
                except ValueError:
                    when = None
        if seconds is None and when is not None:
            if not isinstance(when, dt.datetime):  # a date: its midnight
                when = dt.datetime(when.year, when.month, when.day)
            seconds = (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()
    if seconds is None or not math.isfinite(seconds):
        raise ConfigError(f"{key}: expected Unix seconds or an ISO-8601 date like 2014-01-01 (UTC unless it names a "
                          f"zone), got {value!r}")
    return seconds


MAX_LAYERS = 1000  # more than any published sequential recommender by two orders of magnitude


@dataclass(frozen=True)
class ModelConfig:
    """A model's hyperparameters. Subclasses add fields (``setting``) and checks (``check``).

    ``train_defaults``: the model's own defaults for run settings (e.g. its training scheme and
    step size), applied over ``TrainConfig``'s. A model without hyperparameters uses this class.
    """

    train_defaults: ClassVar[Mapping[str, Any]] = {}

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("dropout_prob") and not 0.0 <= value < 1.0:
                raise ValueError(f"{f.name} must be in [0, 1), got {value!r}")
            # a module per layer is built (on the meta device, by the memory check) before any size is
            # known: a count of layers in the millions would take minutes and gigabytes just to refuse
            if f.name.endswith("layers") and isinstance(value, int) and value > MAX_LAYERS:
                raise ValueError(f"{f.name} must be at most {MAX_LAYERS}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Refuse values the model cannot be built with (``ValueError`` naming the key)."""

    def at_least(self, minimum: int, *keys: str) -> None:
        """Refuse any of ``keys`` below ``minimum``: ``key must be >= minimum``."""
        for key in keys:
            if getattr(self, key) < minimum:
                raise ValueError(f"{key} must be >= {minimum}, got {getattr(self, key)}")


@dataclass(frozen=True)
class TrainConfig:
    """The settings shared by every model: data, training, evaluation. Checks in ``__post_init__``."""

    # --- data ----------------------------------------------------------------------------------
    user_inter_num_interval: str = setting("[5,inf)", "keep users with this many events (iterative k-core)")
    item_inter_num_interval: str = setting("[5,inf)", "keep items with this many events (iterative k-core)")
    duplicate_events: str = setting("drop", "drop | keep: events equal to an earlier one in user, item and timestamp "
                                            "(they put test targets in their own history); keep where they are real")
    split: str = setting("leave_one_out", "leave_one_out: each user's last event is test, the one before valid "
                                          "(RecBole's) | time: global cut-offs valid_time and test_time "
                                          "(docs/protocol.md)")
    valid_time: Any = setting(None, "split=time: validation starts here (Unix seconds or an ISO-8601 date; UTC "
                                    "unless it names a zone); training targets are the events before it")
    test_time: Any = setting(None, "split=time: test starts here (Unix seconds or an ISO-8601 date, after "
                                   "valid_time)")
    max_seq_length: int = setting(50, "L: history truncated to the most recent L items", key="MAX_ITEM_LIST_LENGTH")
    # --- training ------------------------------------------------------------------------------
    train_scheme: str = setting("auto", "prefix | all_positions | cloze (BERT4Rec) | auto (the model's preferred "
                                        "scheme)")
    epochs: int = setting(300, "training epochs at most")
    train_batch_size: int = setting(2048, "samples per step (prefix, cloze) or user windows per step (all_positions)")
    all_positions_stride: int = setting(0, "targets per window in all_positions; < L overlaps windows so that every "
                                           "target sees >= L - stride items of history; 0 = L (no overlap)")
    bucket_batches: bool = setting(True, "trimmed models: batches of similar-length samples, formed inside chunks of "
                                         "50 shuffled batches (less padding, faster); false: uniform batches, as "
                                         "RecBole")
    learning_rate: float = setting(0.001, "Adam's step size")
    lr_scheduler: str = setting("constant", "constant (RecBole) | cosine | linear: decay per step to 0 at the last "
                                            "epoch")
    weight_decay: float = setting(0.0, "Adam's L2 penalty")
    clip_grad_norm: float = setting(0.0, "clip the gradient's norm to this; 0 disables clipping")
    loss_type: str = setting("CE", "CE: full-softmax cross-entropy over all items (the protocol's) | sampled_softmax "
                                   "| gBCE (gSASRec): sampled losses for large catalogs (docs/training.md)")
    negatives: int = setting(1024, "K: negatives drawn per step, shared by all its targets (sampled_softmax with "
                                   "uniform or popularity, gBCE)")
    negative_sampler: str = setting("uniform", "sampled_softmax's negatives: uniform over the items | popularity "
                                               "(training-target counts) | in_batch (the step's other targets; "
                                               "negatives unused)")
    logq_correction: bool = setting(True, "sampled_softmax: subtract log(expected count under the sampler) from "
                                          "each negative's logit")
    gbce_t: float = setting(0.75, "gBCE's calibration t in [0, 1]: beta = alpha (t (1 - 1/alpha) + 1/alpha), "
                                  "alpha = negatives / (items - 1); 0 = plain BCE")
    stopping_step: int = setting(10, "stop after more than this many validations without a better valid_metric "
                                     "(RecBole's rule: a tie counts as better; 0 stops at the first miss)")
    eval_step: int = setting(1, "validate every eval_step epochs")
    seed: int = setting(2020, "seed of every generator (init, dropout, sampling)")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N (under torchrun: cuda = GPU LOCAL_RANK per rank)")
    checkpoint_steps: int = setting(0, "also checkpoint every this many optimiser steps; 0 = only at the end of each "
                                       "epoch")
    dist_timeout: int = setting(1800, "seconds a rank waits in a collective (torchrun runs) before failing instead "
                                      "of hanging")
    # --- evaluation ----------------------------------------------------------------------------
    metrics: list = setting(["hit", "ndcg", "mrr"], "any of hit, ndcg, mrr, recall, precision")
    topk: list = setting([5, 10], "cut-offs K of every metric")
    valid_metric: str = setting("ndcg@10", "METRIC@K that early stopping and the best epoch follow")
    eval_batch_size: int = setting(1024, "users per scoring batch; 4096 measured 2x slower on 2 cores (cache "
                                         "misses)")
    exclude_history: bool = setting(False, "rank history items too (RecBole's sequential protocol); true: leave "
                                           "them out")
    eval_item_chunk: int = setting(65536, "items scored at once in evaluation (memory: eval_batch_size x this x 4 "
                                          "bytes); catalogs up to it are one product, as before; 0 = always one")

    def __post_init__(self) -> None:
        for key in ("epochs", "train_batch_size", "eval_batch_size", "max_seq_length", "eval_step",
                    "learning_rate", "dist_timeout", "negatives"):
            if not getattr(self, key) > 0:
                shown = key_of(self.__dataclass_fields__[key])  # as the user wrote it
                raise ConfigError(f"{shown} must be > 0, got {getattr(self, key)!r}")
        for key in ("weight_decay", "clip_grad_norm", "stopping_step", "all_positions_stride", "checkpoint_steps",
                    "eval_item_chunk"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if not 0 <= self.seed < 2 ** 32:  # the range every generator seeded from it (numpy's) accepts
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed!r}")
        for key in ("user_inter_num_interval", "item_inter_num_interval"):
            parse_interval(getattr(self, key), key)
        check_choice("duplicate_events", self.duplicate_events, DUPLICATE_RULES, ConfigError)
        self._check_split()
        check_choice("train_scheme", self.train_scheme, TRAIN_SCHEMES, ConfigError)
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS, ConfigError)
        loss = str(self.loss_type).lower()  # kept as written: a CE run's config.yaml stays as it was
        if loss not in {name.lower() for name in LOSS_TYPES}:
            raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r} (the "
                              "protocol's numbers use only CE, the full softmax)")
        check_choice("negative_sampler", self.negative_sampler, NEGATIVE_SAMPLERS, ConfigError)
        if self.negative_sampler != "uniform" and loss != "sampled_softmax":
            raise ConfigError(f"negative_sampler={self.negative_sampler} needs loss_type=sampled_softmax (gBCE draws "
                              f"uniform negatives, as gSASRec does; CE draws none); got loss_type={self.loss_type}")
        if not 0.0 <= self.gbce_t <= 1.0:
            raise ConfigError(f"gbce_t must be in [0, 1], got {self.gbce_t!r}")
        metrics = [str(m).lower() for m in self.metrics]
        for m in metrics:
            if m not in METRICS:
                raise ConfigError(f"metrics: unknown metric {m!r}; choose from {', '.join(METRICS)}")
        topk = self.topk
        if not topk or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in topk):
            raise ConfigError(f"topk must be a list of positive integers, got {topk!r}")
        topk = sorted(set(topk))
        try:
            name, k = parse_metric(str(self.valid_metric))
        except MLSA4RecError:
            name, k = "", 0
        if name not in metrics or k not in topk:
            raise ConfigError(f"valid_metric {self.valid_metric!r} is not computed: it must be METRIC@K with METRIC "
                              f"in metrics {metrics} and K in topk {topk}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(self.device)):
            from mlsa4rec.runtime import available_devices  # torch: imported only when needed

            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps (this machine has "
                              f"{', '.join(available_devices())}); got {self.device!r}")
        # the canonical spellings a run directory records
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "topk", topk)
        object.__setattr__(self, "valid_metric", f"{name}@{k}")

    def _check_split(self) -> None:
        """``split`` and its cut-offs: both given for a time split (their order checked; a date
        object that YAML read is recorded as its ISO text), neither for leave-one-out."""
        check_choice("split", self.split, SPLITS, ConfigError)
        given = [key for key in ("valid_time", "test_time") if getattr(self, key) is not None]
        if self.split == "leave_one_out":
            if given:
                raise ConfigError(f"{' and '.join(given)} only go with split=time (split is leave_one_out); add "
                                  "--set split=time or remove them")
            return
        if len(given) < 2:
            raise ConfigError("split=time needs both valid_time and test_time (validation targets drive early "
                              "stopping and the best epoch), e.g. --set valid_time=2014-01-01 --set "
                              "test_time=2014-03-01")
        valid, test = parse_time(self.valid_time, "valid_time"), parse_time(self.test_time, "test_time")
        if not valid < test:
            raise ConfigError(f"valid_time ({self.valid_time}) must be before test_time ({self.test_time})")
        for key in given:
            if not isinstance(getattr(self, key), (int, float, str)):  # a date or datetime YAML read
                object.__setattr__(self, key, getattr(self, key).isoformat())


# --- values as users write them: checked against each default's type ---------------------------

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


def check_value(key: str, value: Any, default: Any) -> Any:
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


def unknown_key(key: str, known: Iterable[str], model: str | None) -> ConfigError:
    close = difflib.get_close_matches(str(key), list(known), n=1)  # YAML keys may be ints or bools
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f" for model {model!r}" if model else ""
    listing = f"`mlsa4rec models --config {model or 'sasrec'}` lists them"
    return ConfigError(f"unknown config key {key!r}{where}{hint} ({listing})")


RUN_FACTS = ("model", "dataset")  # what a run is, not how it runs: stored with its settings, never tuned


def _same_dataset(given: str, resolved: str) -> bool:
    """A saved config.yaml holds the resolved absolute path (or a registered name); a user may write
    the path as given on the command line, so two names of one existing file are the same dataset."""
    if given == resolved:
        return True
    a, b = Path(given).expanduser(), Path(resolved).expanduser()
    return a.is_file() and b.is_file() and a.resolve() == b.resolve()


def check_run_fact(where: str, key: str, value: Any, model: str, dataset: Any = None) -> None:
    """Refuse a ``model``/``dataset`` line that contradicts what the command runs, instead of ignoring it."""
    if value is None:
        return
    given = str(value)
    shown = given if given.isprintable() and given.split() == [given] else repr(given)  # keep the error one line
    said, line = (f"--set {key}={shown}", "it") if where == "--set" else (f"{where} sets {key}: {shown}", "the line")
    if key == "model" and given != model:
        raise ConfigError(f"{said} but the command trains {model!r}; remove {line} or pass --model {shown}")
    if key == "dataset" and dataset is not None and not _same_dataset(given, str(dataset)):
        raise ConfigError(f"{said} but the command trains on {str(dataset)!r}; remove {line} or pass "
                          f"--dataset {shown}")


def resolve_settings(model: str, config_class: type, layers: Iterable[tuple[str, Mapping[str, Any]]],
                     run_fact: Callable[[str, str, Any], None] | None = None) -> tuple[TrainConfig, Any]:
    """The shared settings and model ``model``'s hyperparameters (an instance of ``config_class``),
    from the defaults (``TrainConfig``'s, then the model's own ``train_defaults``) and each layer of
    ``(where, {key: value})`` in order, later winning: every key known, every value of its default's
    type. ``run_fact(where, key, value)`` sees each ``model``/``dataset`` entry (ignored without it)."""
    base = defaults_of(TrainConfig)
    own = {**defaults_of(config_class), **config_class.train_defaults}
    defaults = {**base, **own}
    values = dict(defaults)
    for where, layer in layers:
        for key, value in layer.items():
            if key in RUN_FACTS:  # a saved config.yaml holds them: fine when they agree with the command
                if run_fact is not None:
                    run_fact(where, key, value)
                continue
            if key not in defaults:
                raise unknown_key(key, defaults, model)
            values[key] = check_value(key, value, defaults[key])
    train = from_keys(TrainConfig, {k: values[k] for k in base})
    try:
        hyper = from_keys(config_class, {k: values[k] for k in own if k not in base})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot build model {model!r}: {exc}") from None
    return train, hyper
