"""Studies: a grid of runs (models x datasets x seeds, and named groups of cells) worked through by
one or many workers on Optuna, each cell an ordinary run directory.

A study file names the grid; ``run_study`` checks every cell before any training starts, enqueues
the cells not yet done as fixed Optuna trials (a cell is a trial's user attribute, so nothing is
sampled) and trains them one at a time with ``training.run.train``. The storage (an SQLite file in
the study directory by default, or a PostgreSQL/MySQL URL shared by several machines) is the only
coordination: Optuna hands each waiting trial to one worker, its heartbeat marks the trial of a
worker that died, and its retry callback queues that cell again, which the next worker continues
from the run's checkpoint (``--resume``). A run directory's lock makes sure a cell never trains
twice at once, even if two workers enqueued it together. ``time_budget_s`` pauses the running cell
at a checkpoint and queues it again at once, so the same command continues it.

Workers take cells in the study's queue order (``queue_order``), whatever order Optuna hands out
their trials in: first a cell paused on the worker's machine (a slice never leaves a half-trained
cell behind to start another), then seed by seed: every model's first seed on every dataset and
group before any second seed, so a study stopped part-way already compares every model.

A finished cell leaves a record (``records/<cell>.npz``: its settings, metrics, curve and the test
target rank of every user under both history rules, checksummed), small enough to commit, from
which ``report`` rebuilds every table without the run directories.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlsa4rec.config import build_config, known_keys, load_yaml_file
from mlsa4rec.data import REGISTRY, resolve
from mlsa4rec.data.dataset import array_digest
from mlsa4rec.errors import MLSA4RecError, TimeBudgetSpent
from mlsa4rec.experiments import workers
from mlsa4rec.fileio import atomic_path, write_json_atomic
from mlsa4rec.runs import directory
from mlsa4rec.runtime import cpu_model

log = logging.getLogger("mlsa4rec")

STUDY_KEYS = ("study", "directory", "data_dir", "datasets", "seeds", "models", "groups", "baseline", "focus",
              "claim", "notes", "not_run")
MODEL_KEYS = ("model", "config", "set", "by_dataset", "datasets", "seeds")
DATASET_KEYS = ("config", "set")  # what a model entry's by_dataset adds for one dataset
GROUP_KEYS = ("models", "datasets", "seeds", "set")
CLAIM_KEYS = ("source", "models", "baseline", "datasets", "percent")
NOT_RUN_KEYS = ("models", "datasets", "reason")
COMPARED = ("hit@10", "ndcg@10", "mrr@10")  # the metrics a report tests against a baseline (and a claim names)
MAIN = "main"  # the group of the study file's own models x datasets x seeds
STUDY_JSON = "study.json"
HEARTBEAT_S = 60  # Optuna records a running trial's heartbeat this often; a trial silent for 3x is stale
RECORD_FORMAT = 2  # 1: ranks stored whole (uint16/uint32); 2: capped at RANK_CAP
RANK_CAP = 255  # a record's ranks: anything worse is stored as 255, so metrics at K < 255 are exact
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --- the study file ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelEntry:
    """One model of a study: a registered model with its presets or files and ``--set`` overrides."""

    label: str
    model: str
    config: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # dataset (as the study file names it) -> (config files, overrides) added after the above
    by_dataset: Mapping[str, tuple[tuple[str, ...], Mapping[str, Any]]] = field(default_factory=dict)
    datasets: tuple[str, ...] | None = None  # the only datasets and seeds of its cells, in every group
    seeds: tuple[int, ...] | None = None

    def config_for(self, dataset: str) -> tuple[str, ...]:
        """The config files of this model's cells on ``dataset``: its own, then the dataset's."""
        return self.config + self.by_dataset.get(dataset, ((), {}))[0]

    def overrides_for(self, dataset: str) -> dict[str, Any]:
        return {**self.overrides, **self.by_dataset.get(dataset, ((), {}))[1]}


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    group: str
    entry: ModelEntry
    dataset: str  # as the study file names it: a registered name or a file path
    seed: int
    overrides: Mapping[str, Any] = field(default_factory=dict)  # the model's, the group's, and the seed

    @property
    def id(self) -> str:
        return f"{self.group}/{self.entry.label}/{dataset_name(self.dataset)}/seed-{self.seed}"

    def run_dir(self, root: Path) -> Path:
        return root / "runs" / self.id

    def record_path(self, root: Path) -> Path:
        return root / "records" / f"{self.id}.npz"


@dataclass(frozen=True)
class Study:
    name: str
    file: Path
    directory: Path
    data_dir: str | None
    models: Mapping[str, ModelEntry]
    cells: tuple[Cell, ...]
    baseline: str | None
    focus: tuple[str, ...] = ()  # the models the study is about: also compared with the best of the others
    claim: Claim | None = None
    notes: tuple[str, ...] = ()  # caveats the report states before its tables
    not_run: tuple[NotRun, ...] = ()


@dataclass(frozen=True)
class Claim:
    """What a paper claims for some models of the study against one baseline on the main grid: each
    metric's relative change as a range in percent, which the report sets beside what was measured."""

    source: str
    models: tuple[str, ...]
    baseline: str
    datasets: tuple[str, ...]  # as tables name them (``dataset_name``)
    percent: Mapping[str, tuple[float, float]]


@dataclass(frozen=True)
class NotRun:
    """Cells a study deliberately leaves out (models x datasets), with the reason and its cost."""

    models: tuple[str, ...]
    datasets: tuple[str, ...]
    reason: str


def dataset_name(dataset: str) -> str:
    """A dataset's name in paths and tables: the registered name, or the data file's stem."""
    return dataset if dataset in REGISTRY else Path(dataset).name.split(".")[0]


def _fail(where: Path, what: str) -> MLSA4RecError:
    return MLSA4RecError(f"study file {str(where)!r}: {what}")


def _keys(where: Path, name: str, value: Any, allowed: Iterable[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"{name} must be a mapping of key: value lines")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r} in {name}; the keys are {', '.join(allowed)}")
    return value


def _names(where: Path, name: str, value: Any, kind: type) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, kind) and not isinstance(v, bool) for v in items):
        raise _fail(where, f"{name} must be a non-empty list of {kind.__name__}s, got {value!r}")
    if len(set(items)) != len(items):
        raise _fail(where, f"{name} lists an entry twice: {value!r}")
    return items


def _label(where: Path, what: str, label: Any) -> str:
    if not isinstance(label, str) or not _NAME.match(label):
        raise _fail(where, f"{what} {label!r} must be a name of letters, digits, '.', '_' and '-' (used in paths)")
    return label


def load_study(path: str | Path, directory_override: str | Path | None = None, check: bool = True) -> Study:
    """Read and check a study file: its keys, models, datasets and seeds, and (``check``) every
    cell's settings, each built as ``mlsa4rec train`` would build it, before anything is trained."""
    where = Path(path)
    raw = _keys(where, "the file", load_yaml_file(where, "study file", "mlsa4rec study run FILE"),
                STUDY_KEYS)
    name = _label(where, "study", raw.get("study", where.stem))
    base = where.parent
    data_dir = raw.get("data_dir")
    if data_dir is not None:
        data_dir = str((base / str(data_dir)).resolve()) if not Path(str(data_dir)).is_absolute() else str(data_dir)
    models: dict[str, ModelEntry] = {}
    for label, spec in _keys(where, "models", raw.get("models"), raw.get("models") or {}).items():
        spec = _keys(where, f"model {label!r}", {"model": label} if spec is None else spec, MODEL_KEYS)
        files, overrides = _config_and_set(where, base, f"model {label!r}", spec)
        by_dataset = {}
        for dataset, extra in _keys(where, f"model {label!r}: by_dataset", spec.get("by_dataset") or {},
                                    spec.get("by_dataset") or {}).items():
            extra = _keys(where, f"model {label!r}: by_dataset: {dataset}", extra or {}, DATASET_KEYS)
            by_dataset[_dataset_path(base, str(dataset))] = _config_and_set(
                where, base, f"model {label!r}: by_dataset: {dataset}", extra)
        only_datasets = only_seeds = None
        if "datasets" in spec:
            only_datasets = tuple(_dataset_path(base, d) for d in
                                  _names(where, f"model {label!r}: datasets", spec["datasets"], str))
        if "seeds" in spec:
            only_seeds = tuple(_names(where, f"model {label!r}: seeds", spec["seeds"], int))
        models[_label(where, "model label", label)] = ModelEntry(label, str(spec.get("model", label)), files,
                                                                 overrides, by_dataset, only_datasets, only_seeds)
    if not models:
        raise _fail(where, "models is empty; name at least one model")
    groups = {MAIN: {"models": list(models), "datasets": raw.get("datasets"), "seeds": raw.get("seeds", [2020])}}
    for group, spec in _keys(where, "groups", raw.get("groups") or {}, raw.get("groups") or {}).items():
        if _label(where, "group", group) == MAIN:
            raise _fail(where, f"the group name {MAIN!r} is the study's own grid; choose another")
        groups[group] = _keys(where, f"group {group!r}", spec, GROUP_KEYS)
    cells = []
    for group, spec in groups.items():
        labels = _names(where, f"{group}: models", spec.get("models", list(models)), str)
        for label in labels:
            if label not in models:
                raise _fail(where, f"group {group!r} names model {label!r}, which models does not define")
        extra = _keys(where, f"group {group!r}: set", spec.get("set") or {}, spec.get("set") or {})
        datasets = _names(where, f"{group}: datasets", spec.get("datasets", raw.get("datasets")), str)
        datasets = [_dataset_path(base, d) for d in datasets]
        seeds = _names(where, f"{group}: seeds", spec.get("seeds", raw.get("seeds", [2020])), int)
        for label in labels:
            entry = models[label]
            for dataset in datasets:
                if entry.datasets is not None and dataset not in entry.datasets:
                    continue
                for seed in seeds:
                    if entry.seeds is not None and seed not in entry.seeds:
                        continue
                    cells.append(Cell(group, entry, dataset, seed, {**entry.overrides_for(dataset), **extra,
                                                                    "seed": seed}))
    used = {c.dataset for c in cells}
    for entry in models.values():
        if not any(c.entry is entry for c in cells):
            raise _fail(where, f"model {entry.label!r} has no cell: its datasets or seeds match none of any group that "
                               "lists it; fix them, or remove the model")
        for dataset in entry.by_dataset:
            if dataset not in used:
                raise _fail(where, f"model {entry.label!r}: by_dataset names {dataset!r}, which no group of the study "
                                   "trains on; name a dataset of datasets (as it is written there)")
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise _fail(where, f"two cells share the id {twice!r} (two datasets with one file name?)")
    baseline = raw.get("baseline")
    if baseline is not None and (not isinstance(baseline, str) or baseline not in models):
        raise _fail(where, f"baseline {baseline!r} is not one of the models ({', '.join(models)})")
    root = Path(directory_override) if directory_override else base / str(raw.get("directory") or name)
    focus = tuple(_names(where, "focus", raw["focus"], str)) if "focus" in raw else ()
    for label in focus:
        if label not in models:
            raise _fail(where, f"focus names {label!r}, which is not one of the models ({', '.join(models)})")
    if baseline is not None and baseline in focus:
        raise _fail(where, f"the baseline {baseline!r} cannot also be in focus (the models compared with it and with "
                           "the best of the others)")
    notes = tuple(_text(where, "notes", n) for n in (_names(where, "notes", raw["notes"], str)
                                                     if "notes" in raw else ()))
    claim = _claim(where, raw["claim"], models, baseline, cells) if "claim" in raw else None
    entries = raw.get("not_run") or []
    not_run = tuple(_not_run(where, i, spec, models, cells)
                    for i, spec in enumerate(entries if isinstance(entries, list) else [entries]))
    study = Study(name, where.resolve(), root, data_dir, models, tuple(cells), baseline, focus, claim, notes,
                  not_run)
    if check:
        check_cells(study)
    return study


def _text(where: Path, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"{name} must be non-empty text, got {value!r}")
    return " ".join(value.split())


def _model_labels(where: Path, name: str, value: Any, models: Mapping[str, ModelEntry]) -> tuple[str, ...]:
    labels = tuple(_names(where, name, value, str))
    for label in labels:
        if label not in models:
            raise _fail(where, f"{name} names {label!r}, which is not one of the models ({', '.join(models)})")
    return labels


def _claim(where: Path, spec: Any, models: Mapping[str, ModelEntry], baseline: str | None,
           cells: list[Cell]) -> Claim:
    """The ``claim:`` block: which models, against which baseline, on which datasets of the main grid,
    and each metric's claimed relative change ``[low, high]`` in percent."""
    spec = _keys(where, "claim", spec, CLAIM_KEYS)
    for key in ("source", "models", "percent"):
        if key not in spec:
            raise _fail(where, f"claim needs {key}: (the keys are {', '.join(CLAIM_KEYS)})")
    labels = _model_labels(where, "claim: models", spec["models"], models)
    against = spec.get("baseline", baseline)
    if against is None:
        raise _fail(where, "claim: name the model it is measured against (baseline:, here or at the top)")
    if not isinstance(against, str) or against not in models or against in labels:
        raise _fail(where, f"claim: baseline {against!r} must be one of the models ({', '.join(models)}) and not one "
                           "of the claim's own")
    main = {dataset_name(c.dataset) for c in cells if c.group == MAIN}
    datasets = tuple(_names(where, "claim: datasets", spec["datasets"], str)) if "datasets" in spec \
        else tuple(sorted(main))
    for dataset in datasets:
        if dataset not in main:
            raise _fail(where, f"claim: dataset {dataset!r} is not one of the study's main grid "
                               f"({', '.join(sorted(main))})")
    percent = {}
    for metric, span in _keys(where, "claim: percent", spec["percent"], COMPARED).items():
        if (not isinstance(span, list) or len(span) != 2 or not all(isinstance(v, int | float) and not isinstance(
                v, bool) and np.isfinite(v) for v in span) or span[0] > span[1]):
            raise _fail(where, f"claim: percent: {metric} must be [low, high] in percent, low <= high; got {span!r}")
        percent[metric] = (float(span[0]), float(span[1]))
    if not percent:
        raise _fail(where, f"claim: percent names no metric; give one or more of {', '.join(COMPARED)}")
    return Claim(_text(where, "claim: source", spec["source"]), labels, against, datasets, percent)


def _not_run(where: Path, index: int, spec: Any, models: Mapping[str, ModelEntry], cells: list[Cell]) -> NotRun:
    """One ``not_run:`` entry: models x datasets the study leaves out, none of them a cell it trains."""
    what = f"not_run entry {index + 1}"
    spec = _keys(where, what, spec, NOT_RUN_KEYS)
    if set(spec) != set(NOT_RUN_KEYS):
        raise _fail(where, f"{what} needs models:, datasets: and reason:")
    labels = _model_labels(where, f"{what}: models", spec["models"], models)
    datasets = tuple(_names(where, f"{what}: datasets", spec["datasets"], str))
    trained = {(c.entry.label, dataset_name(c.dataset)) for c in cells}
    for label in labels:
        for dataset in datasets:
            if (label, dataset) in trained:
                raise _fail(where, f"{what} lists {label!r} on {dataset!r}, which the study trains; remove one")
    return NotRun(labels, datasets, _text(where, f"{what}: reason", spec["reason"]))


def cell_command(cell: Cell, study: Study) -> str:
    """The ``mlsa4rec train`` command that trains ``cell`` alone, exactly as the study does (paths
    shown relative to the working directory where they lie under it)."""
    args = ["mlsa4rec", "train", "--model", cell.entry.model, "--dataset", shown_path(cell.dataset)]
    if study.data_dir is not None:
        args += ["--data-dir", shown_path(study.data_dir)]
    args += ["--output-dir", shown_path(cell.run_dir(study.directory))]
    for config in cell.entry.config_for(cell.dataset):
        args += ["--config", shown_path(config)]
    for key, value in cell.overrides.items():
        text = value if isinstance(value, str) and _yaml_reads_as(value) else json.dumps(value)
        args += ["--set", f"{key}={text}"]
    return shlex.join(args)


def _yaml_reads_as(text: str) -> bool:
    """Whether ``--set KEY=text`` gives back the string ``text`` (``yes`` or ``1e-3`` would not)."""
    import yaml

    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def shown_path(path: str | Path) -> str:
    """``path`` relative to the working directory where they share more than the root (a report
    committed with a repository names files as the repository does, not by one machine's absolute
    paths); a name that is no path here (a registered dataset, a preset) as given."""
    given = Path(path)
    if not given.is_absolute() and not given.exists():
        return str(path)
    full, here = os.path.abspath(given), os.path.abspath(Path.cwd())
    try:  # beside the working directory too (../shared/data), but not by climbing to the root
        return os.path.relpath(full, here) if os.path.commonpath([full, here]) != os.path.abspath(os.sep) else full
    except ValueError:  # another drive
        return full


def _dataset_path(base: Path, dataset: str) -> str:
    """A dataset as cells name it: a registered name, or a data file relative to the study file."""
    return dataset if dataset in REGISTRY or not (base / dataset).is_file() else str(base / dataset)


def _config_and_set(where: Path, base: Path, what: str, spec: Mapping[str, Any]
                    ) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The ``config`` (presets or files, files relative to the study file) and ``set`` of ``spec``."""
    files = spec.get("config", [])
    files = [files] if isinstance(files, str) else files
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise _fail(where, f"{what}: config must be a preset name, a file or a list of them")
    files = [str(base / f) if (base / f).is_file() else f for f in files]
    overrides = _keys(where, f"{what}: set", spec.get("set") or {}, spec.get("set") or {})
    return tuple(files), dict(overrides)


def check_cells(study: Study) -> None:
    """Every cell's settings as training would build them, and every dataset found: one error line
    naming the cell, before any training starts."""
    for dataset in sorted({c.dataset for c in study.cells}):
        try:
            resolve(dataset, study.data_dir)
        except MLSA4RecError as exc:
            raise _fail(study.file, f"dataset {dataset!r}: {exc}") from None
    for cell in study.cells:
        try:
            cell_config(cell, study)
        except MLSA4RecError as exc:
            raise _fail(study.file, f"cell {cell.id}: {exc}") from None


def cell_config(cell: Cell, study: Study):
    """The cell's typed config, exactly as ``mlsa4rec train`` builds it."""
    return build_config(cell.entry.model, list(cell.entry.config_for(cell.dataset)), dict(cell.overrides),
                        extra={"dataset": _dataset_arg(cell.dataset)})


def _dataset_arg(dataset: str) -> str:
    return dataset if dataset in REGISTRY else str(Path(dataset).resolve())


# --- the study directory and its storage -------------------------------------------------------

def open_directory(study: Study, storage: str | None) -> str:
    """Create (or reopen) the study directory, refusing one that holds another study; returns the
    storage URL (the directory's SQLite file unless one is given)."""
    root = study.directory
    meta_path = root / STUDY_JSON
    meta = read_meta(root) if meta_path.exists() else None
    if meta is not None and meta.get("study") != study.name:
        raise MLSA4RecError(f"{str(root)!r} holds the study {meta.get('study')!r}, not {study.name!r}; give each study "
                            "its own directory (directory: in the study file, or --dir)")
    # what another worker starting the same study at this moment may have made so far
    starting = [p for p in root.iterdir() if p.name not in ("study.db", "study.db-journal")
                and not p.name.startswith(f".{STUDY_JSON}.")] if root.exists() else []
    if root.exists() and meta is None and starting:
        raise MLSA4RecError(f"{str(root)!r} exists and is not a study directory; choose another directory")
    url = storage or (meta or {}).get("storage") or default_storage(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    if meta is not None and Path(meta["file"]).resolve() != study.file:
        log.warning("study %s now reads its grid from %s (it was %s)", study.name, study.file, meta["file"])
    if meta is None:  # first the name, so that a worker starting beside this one sees a study directory
        _write_meta(study, url)
    try:
        storage_for(url)  # a URL that cannot be opened fails here, before anything else is written
    except MLSA4RecError:
        if created:
            shutil.rmtree(root, ignore_errors=True)  # ours: made a moment ago
        raise
    if meta is not None and (meta.get("storage") != url or Path(meta["file"]).resolve() != study.file):
        _write_meta(study, url)
    return url


def _write_meta(study: Study, url: str) -> None:
    """study.json: paths relative to the directory, the default storage unnamed, so that a committed
    study directory (records, report) is read the same on another machine."""
    root = study.directory
    write_json_atomic(root / STUDY_JSON, {"kind": "mlsa4rec study", "study": study.name,
                                          "file": os.path.relpath(study.file, root.resolve()),
                                          "storage": None if url == default_storage(root) else url})


def default_storage(root: Path) -> str:
    return f"sqlite:///{(root / 'study.db').resolve()}"


def read_meta(root: Path) -> dict[str, Any]:
    try:
        meta = json.loads((root / STUDY_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MLSA4RecError(f"{str(root / STUDY_JSON)!r} cannot be read ({exc}); is this a study directory?") from None
    if (not isinstance(meta, dict) or meta.get("kind") != "mlsa4rec study" or not isinstance(meta.get("file"), str)
            or not isinstance(meta.get("study"), str)):
        raise MLSA4RecError(f"{str(root)!r} is not a study directory (its {STUDY_JSON} is not mlsa4rec's); restore it "
                            "or run the study file again with --dir")
    return {**meta, "file": str(root / meta["file"]), "storage": meta.get("storage") or default_storage(root)}


def storage_for(url: str, heartbeat_s: int = HEARTBEAT_S):
    """Optuna's RDB storage with heartbeats: a worker that dies leaves a trial that goes stale after
    3 missed heartbeats, and is queued again (its cell continues from its checkpoint)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed cell is one line of ours, not Optuna's traceback
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: since 2.8
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    failure: Exception | None = None
    for attempt in range(4):  # two workers creating a new storage's tables at once: the loser tries again
        try:
            storage = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                                 grace_period=3 * heartbeat_s,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=None))
            if url.startswith("sqlite"):
                _serializable_sqlite(storage.engine)
            return storage
        except Exception as exc:  # sqlalchemy and driver errors of many types: a URL that cannot be used
            failure = exc
            time.sleep(0.25 * (attempt + 1))
    first = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    raise MLSA4RecError(f"the study storage {url!r} cannot be opened ({first}); check the URL (sqlite:///PATH, "
                        "postgresql://USER@HOST/DB, mysql+pymysql://USER@HOST/DB) and that its driver is "
                        "installed")


def _serializable_sqlite(engine) -> None:
    """Every SQLite transaction takes the write lock when it begins (SQLAlchemy's recipe for
    serializable SQLite). Without it two workers can both read a waiting trial as waiting and both
    take it: pysqlite defers the lock to the first write, after Optuna's check has read."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed


def _load_optuna_study(study: Study, url: str):
    """The study's trials, for reading: nothing is created in the storage."""
    import optuna

    try:
        return optuna.load_study(study_name=study.name, storage=storage_for(url))
    except KeyError:
        raise MLSA4RecError(f"the storage {url!r} holds no study {study.name!r}; run `mlsa4rec study run` first, or "
                            "pass the --storage its workers use") from None


def _optuna_study(study: Study, url: str, heartbeat_s: int = HEARTBEAT_S):
    import optuna

    return optuna.create_study(study_name=study.name, storage=storage_for(url, heartbeat_s), load_if_exists=True,
                               direction="maximize")


# --- working through the cells -----------------------------------------------------------------

def cell_state(cell: Cell, root: Path) -> str:
    """``done`` (its record exists), ``published`` (a finished run without a record yet), ``paused``
    (a stage with a checkpoint) or ``new``."""
    if cell.record_path(root).is_file():
        return "done"
    run = cell.run_dir(root)
    if (run / directory.MANIFEST).is_file():
        return "published"
    if (directory.staging_dir(run) / "checkpoint.pt").is_file():
        return "paused"
    return "new"


def completed_cells(opt_study) -> set[str]:
    """Cells a trial has completed, on any machine of the storage."""
    from optuna.trial import TrialState

    return {t.user_attrs.get("cell") for t in opt_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}


def enqueue(opt_study, study: Study) -> int:
    """Queue every cell that has no record here, no completed trial anywhere and no waiting or
    running trial; returns how many."""
    from optuna.trial import TrialState

    active = {t.user_attrs.get("cell") for t in opt_study.get_trials(deepcopy=False,
                                                                     states=(TrialState.WAITING, TrialState.RUNNING))}
    active |= completed_cells(opt_study)
    queued = 0
    order = queue_order(study)
    for cell in sorted(study.cells, key=lambda c: order[c.id]):
        if cell.id not in active and cell_state(cell, study.directory) != "done":
            opt_study.enqueue_trial({}, user_attrs={"cell": cell.id})
            queued += 1
    return queued


def stale_cells(study: Study) -> list[tuple[str, list[str]]]:
    """Cells whose record or finished run was made with other settings than the study file now
    gives them (the file was edited after they finished): ``(cell, [differing keys])``."""
    from mlsa4rec.runs.loading import load_run_config

    stale = []
    for cell in study.cells:
        state = cell_state(cell, study.directory)
        if state == "done":
            saved = read_record(cell.record_path(study.directory))[0]["settings"]
        elif state == "published":
            saved = load_run_config(cell.run_dir(study.directory)).to_dict()
        else:
            continue
        now = cell_config(cell, study).to_dict()
        # a setting added after the cell finished ran at its default (as checkpoint.check_resumable reads it)
        saved = {**{k: v for k, v in known_keys(now["model"]).items() if k not in saved}, **saved}
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if differ:
            stale.append((cell.id, differ))
    return stale


def check_not_stale(study: Study) -> None:
    """Refuse to go on from results made with settings the study file no longer gives."""
    stale = stale_cells(study)
    if stale:
        cell, keys = stale[0]
        more = f" (and {len(stale) - 1} more cells)" if len(stale) > 1 else ""
        raise MLSA4RecError(f"cell {cell} finished with other settings than the study file now gives "
                            f"({', '.join(keys)}){more}; restore the file, or delete that cell's record and run "
                            f"directory under {str(study.directory)!r} to train it again, or give the changed grid "
                            "its own study")


def run_study(path: str | Path, *, storage: str | None = None, directory_override: str | Path | None = None,
              time_budget_s: float | None = None, heartbeat_s: int = HEARTBEAT_S, wait: bool = True,
              adopt_runs: Iterable[str | Path] = (), whole_cells: bool = False) -> str | None:
    """Work through the study's cells with the other workers of its storage until none is left.
    Returns None when finished, else why it paused (``time_budget_s``, SIGTERM; the same call continues);
    raises, naming them, when cells failed (the others were still trained). ``whole_cells``: start
    only cells expected to finish within the budget left (``Fit``), for a machine whose disk does
    not outlive the slice, where a paused cell is lost."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    from mlsa4rec.evaluation import runs as _records  # noqa: F401 (what records are made with, imported now:
    from mlsa4rec.runs import loading as _loading  # noqa: F401  the code of the commit the cells name)
    from mlsa4rec.training import stop
    from mlsa4rec.training.run import deadline_for, git_commit

    if whole_cells and time_budget_s is None:
        raise MLSA4RecError("--whole-cells needs --time-budget: it starts only the cells that the budget left can "
                            "finish")
    deadline = deadline_for(time_budget_s)
    git_commit()  # the code this worker imported: its cells name it, whatever HEAD becomes meanwhile
    study = load_study(path, directory_override)
    if (study.directory / STUDY_JSON).is_file():
        check_not_stale(study)
    matches = match_runs(study, adopt_runs)  # before anything is written
    url = open_directory(study, storage)
    adopt(study, matches)
    opt = _optuna_study(study, url, heartbeat_s)
    _check_heartbeat(opt, heartbeat_s)
    by_id = {c.id: c for c in study.cells}
    order = queue_order(study)
    log.info("study %s: %d cells, %d queued now (%s)", study.name, len(study.cells), enqueue(opt, study), url)
    paused: str | None = None  # why this worker stopped before the queue was empty
    failed: dict[str, str] = {}
    fit = Fit(study) if whole_cells else None

    def out_of_time() -> bool:  # no cell starts once the budget is spent or a pause was asked for (SIGTERM)
        return stop.requested() or (deadline is not None and time.monotonic() >= deadline)

    def objective(trial) -> float:
        nonlocal paused
        workers.mark(trial)  # should this process die, a worker here hands the trial back at once
        cell = by_id.get(trial.user_attrs.get("cell", ""))
        if cell is None:  # a cell this worker's file does not name (or Optuna's own trial): leave it queued
            if "cell" in trial.user_attrs:
                opt.enqueue_trial({}, user_attrs=dict(trial.user_attrs))
            trial.set_user_attr("skipped", "not a cell of this study file")
            opt.stop()
            raise _pruned()
        if cell_state(cell, study.directory) == "done" or cell.id in completed_cells(opt):
            trial.set_user_attr("skipped", "already done")  # a second trial of a cell two workers both queued
            raise _pruned()
        cell = _next_cell(trial, cell, by_id, order, study.directory, last=fit.too_long if fit else ())
        remaining = None if deadline is None else max(deadline - time.monotonic(), 1e-9)
        exhausted = fit is not None and cell.id in fit.too_long  # a cell left before came first: all are too long
        if exhausted or fit is not None and not fit.may_start(cell, remaining):
            trial.set_user_attr("skipped", f"would not finish in the {remaining:.0f} s left")
            opt.enqueue_trial({}, user_attrs={"cell": cell.id})  # for a later slice, in its place
            if exhausted:
                paused = f"no waiting cell can finish in the {remaining:.0f} s left (--whole-cells)"
                opt.stop()
            raise _pruned()
        try:
            return run_cell(cell, study, remaining, fit.watch(cell, remaining) if fit else None)
        except TimeBudgetSpent:
            if fit is not None and cell.id in fit.too_long:  # its pace showed it would not finish: another cell
                trial.set_user_attr("paused", True)
                opt.enqueue_trial({}, user_attrs={"cell": cell.id})
                raise _pruned() from None
            paused = stop.why_paused()
            trial.set_user_attr("paused", True)
            opt.enqueue_trial({}, user_attrs={"cell": cell.id})  # at once, for whoever runs next
            opt.stop()
            raise _pruned() from None
        except KeyboardInterrupt:  # Ctrl-C: the cell stays paused at its checkpoint, queued again at once
            trial.set_user_attr("paused", True)
            opt.enqueue_trial({}, user_attrs={"cell": cell.id})
            raise
        except CellTaken as exc:
            trial.set_user_attr("skipped", str(exc))
            raise _pruned() from None
        except MLSA4RecError as exc:
            trial.set_user_attr("error", str(exc))
            failed[cell.id] = str(exc)
            log.error("cell %s failed: %s", cell.id, exc)
            raise

    while not paused:
        if out_of_time():
            paused = stop.why_paused()
            break
        workers.fail_dead_workers(opt)  # a cell whose worker died here goes back to the queue at once,
        fail_stale_trials(opt)  # and one whose worker went silent anywhere, after three missed heartbeats
        if opt.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            try:
                opt.optimize(objective, n_trials=1, catch=(MLSA4RecError,))
            except (ValueError, AssertionError) as exc:  # Optuna's tell, when another worker took this trial as dead
                taken = workers.told_after_takeover(exc)
                if taken is None:
                    raise
                log.warning("a trial of this worker was taken over by another (%s); going on", taken)
            continue
        running = opt.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or not wait:
            break
        time.sleep(min(heartbeat_s, 5))  # another worker's cells: wait to take one over should it die
    if failed:
        first, why = next(iter(failed.items()))
        raise MLSA4RecError(f"{len(failed)} cell(s) failed, {first} first: {why}; the other cells went on "
                            "(`mlsa4rec study status` lists them); fix the cause and run the same command again")
    return paused


def queue_order(study: Study) -> dict[str, int]:
    """Each cell's place in the queue: seed rounds (a model's first seed, in the study file's seed
    order, is its round 0), then the groups, datasets and models in the study file's order."""
    seeds = list(dict.fromkeys(c.seed for c in study.cells))
    groups = list(dict.fromkeys(c.group for c in study.cells))
    datasets = list(dict.fromkeys(c.dataset for c in study.cells))
    models = list(study.models)
    rounds = {}
    for cell in study.cells:  # a model with seeds [2021] alone has 2021 as its first round
        own = sorted({c.seed for c in study.cells if c.entry is cell.entry}, key=seeds.index)
        rounds[cell.id] = own.index(cell.seed)
    ranked = sorted(study.cells, key=lambda c: (rounds[c.id], seeds.index(c.seed), groups.index(c.group),
                                                  datasets.index(c.dataset), models.index(c.entry.label)))
    return {c.id: i for i, c in enumerate(ranked)}


def _next_cell(trial, cell: Cell, by_id: Mapping[str, Cell], order: Mapping[str, int], root: Path,
               last: Iterable[str] = ()) -> Cell:
    """The cell this trial trains: the first in queue order among its own and those of the waiting
    trials, a cell paused (or finished without a record) on this machine before any other, the
    cells ``last`` names (too long for the time left) after all others. Optuna
    hands out waiting trials oldest first, and a paused cell is queued again at the end; this
    keeps the study's order whatever the trials' order. The two trials swap cells, so the handed
    cell keeps a place in the queue; should another worker take the waiting trial meanwhile, the
    handed cell is queued again (a trial that finds its cell done or being trained is skipped)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    last = set(last)

    def key(c: Cell) -> tuple[int, int]:
        return 2 if c.id in last else 0 if cell_state(c, root) in ("paused", "published") else 1, order[c.id]

    storage = trial.storage
    waiting = [(key(by_id[t.user_attrs["cell"]]), t) for t in trial.study.get_trials(
        deepcopy=False, states=(TrialState.WAITING,)) if t.user_attrs.get("cell") in by_id]
    completed = completed_cells(trial.study)  # on any machine of the storage
    for rank, other in sorted(waiting, key=lambda x: x[0]):
        if rank >= key(cell):
            break
        first = by_id[other.user_attrs["cell"]]
        if cell_state(first, root) == "done" or first.id in completed:  # a duplicate trial: skipped when its turn comes
            continue
        try:
            storage.set_trial_user_attr(other._trial_id, "cell", cell.id)
        except UpdateFinishedTrialError:  # finished by another worker meanwhile
            continue
        if storage.get_trial(other._trial_id).state != TrialState.WAITING:
            trial.study.enqueue_trial({}, user_attrs={"cell": cell.id})
        trial.set_user_attr("cell", first.id)
        return first
    return cell


def _check_heartbeat(opt, heartbeat_s: int) -> None:
    """Every worker of a study must use one heartbeat: a worker with a longer one would be taken
    for dead by the others while it trains."""
    recorded = opt.user_attrs.get("heartbeat_s")
    if recorded is None:
        opt.set_user_attr("heartbeat_s", heartbeat_s)
    elif recorded != heartbeat_s:
        raise MLSA4RecError(f"this study's workers use --heartbeat {recorded}, not {heartbeat_s}; every worker of a "
                            f"study must use the same (pass --heartbeat {recorded})")


def _pruned():
    import optuna

    return optuna.TrialPruned()


class CellTaken(MLSA4RecError):
    """Another worker is training this cell (its stage is locked): this trial leaves it alone."""


def run_cell(cell: Cell, study: Study, time_budget_s: float | None,
             on_epoch: Callable[[dict[str, Any]], str | None] | None = None) -> float:
    """Train one cell (continuing its checkpoint, or adopting its finished run) and write its
    record; returns its validation metric. ``on_epoch`` gets each epoch's history row (and may
    return a reason to pause, ``Fit.watch``)."""
    from mlsa4rec.training.run import train

    root, out = study.directory, cell.run_dir(study.directory)
    state = cell_state(cell, root)
    if state != "done":
        if state != "published":
            log.info("cell %s: %s", cell.id, "continuing from its checkpoint" if state == "paused" else "training")
            try:
                train(cell.entry.model, _dataset_arg(cell.dataset), out, list(cell.entry.config_for(cell.dataset)),
                      dict(cell.overrides), study.data_dir, resume=state == "paused", time_budget_s=time_budget_s,
                      on_epoch=on_epoch)
            except directory.StageBusy:
                raise CellTaken(f"cell {cell.id} is being trained by another worker") from None
        write_record(cell, study)
    meta = read_record(cell.record_path(root))[0]
    return float(meta["valid"][meta["settings"]["valid_metric"]])


def _seconds(meta: dict[str, Any]) -> float:
    """A recorded cell's seconds, training and validation."""
    return sum(row.get("train_seconds", 0.0) + row.get("eval_seconds", 0.0) for row in meta["history"])


class Fit:
    """``--whole-cells``: which cells a worker starts with the time budget it has left. A cell's cost
    comes from the study's own records: seconds (validation included) as its other seeds took on the
    same dataset and group, the longest; epochs as its ``epochs`` where early stopping cannot end it
    sooner (``stopping_step`` + 1 >= ``epochs``), else the most that cells of its model entry ran in
    its group on its dataset, else the most its model ran in the other groups (such as the main
    group, for a longer-sequence repeat) on its dataset, else the most its model entry ran in its
    group on the other datasets, else the median that every recorded cell of its group ran, else
    the most its model ran in any group on any dataset (at most its ``epochs``).
    A cell with no seed recorded on its dataset is costed from the pace this worker watched its
    model keep there (another seed's epochs, paused), else from its model's pace on another dataset
    times how much slower the models recorded on both run on its own (the median ratio; a watched
    pace counts as recorded, so one paused first epoch on a new dataset is enough), so that the end
    of a slice is not spent on first epochs of cells that cannot finish. A cell whose known cost
    exceeds the time left is not started; one under way is paused after any epoch whose pace (the
    median of its epochs so far), times the epochs still expected, exceeds it (its epochs are kept at
    the checkpoint: paused cells still advance slice by slice). A cell with no record to go by runs,
    as without the option. Recorded seconds include whatever else shared the machine, so they err
    long."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self.too_long: set[str] = set()  # cells this worker left for a later slice (time only shrinks)
        self._read: dict[str, dict[str, Any]] = {}  # records already read (a record, once written, stays)
        self._watched: dict[tuple[str, str, str], float] = {}  # (group, entry, dataset) -> s/epoch seen here

    def _meta(self, cell: Cell) -> dict[str, Any] | None:
        """``cell``'s record (its metadata), read once; None while it has none."""
        if cell.id not in self._read:
            path = cell.record_path(self.study.directory)
            if not path.is_file():
                return None
            self._read[cell.id] = read_record(path)[0]
        return self._read[cell.id]

    def _records(self, cell: Cell, same_dataset: bool = False, any_entry: bool = False,
                 any_group: bool = False) -> list[dict[str, Any]]:
        """The records of the cells of ``cell``'s group and model entry (any entry with
        ``any_entry``; the entry of its label in any group with ``any_group``; ``cell``'s dataset
        only with ``same_dataset``)."""
        def mine(c: Cell) -> bool:
            if any_group:
                return c.entry.label == cell.entry.label
            return c.group == cell.group and (any_entry or c.entry is cell.entry)

        metas = (self._meta(c) for c in self.study.cells
                 if mine(c) and (c.dataset == cell.dataset or not same_dataset))
        return [meta for meta in metas if meta is not None]

    def expected_epochs(self, cell: Cell) -> int | None:
        train = cell_config(cell, self.study).train
        if train.stopping_step + 1 >= train.epochs:  # early stopping cannot end it before its last epoch
            return train.epochs
        # Epochs differ far more across models and datasets than across groups (settings such as
        # L): the model's own runs on this dataset come first (SASRec stopped after 23 epochs on
        # Video Games but 44 on Beauty), then its runs on this dataset in another group, then its
        # own runs on the other datasets, then what the other models of its group ran, then its
        # model's runs anywhere.
        def epochs_of(metas: list[dict[str, Any]]) -> list[int]:
            return [int(meta["epochs_run"]) for meta in metas]

        group = epochs_of(self._records(cell, any_entry=True))
        ran = (epochs_of(self._records(cell, same_dataset=True))
               or epochs_of(self._records(cell, any_group=True, same_dataset=True))
               or epochs_of(self._records(cell))
               or ([int(np.median(group))] if group else [])
               or epochs_of(self._records(cell, any_group=True)))
        if not ran or not max(ran):
            return None
        return min(max(ran), train.epochs)

    def guessed_seconds(self, cell: Cell) -> float | None:
        """What ``cell`` would take where none of its seeds ran on its dataset: its expected epochs
        at the pace this worker watched its model keep there, else at its model's pace on another
        dataset times the median ratio of the paces (its dataset's to that one's) of the models
        recorded on both, the longest such guess; None without one."""
        epochs = self.expected_epochs(cell)
        paces: dict[tuple[str, str], list[float]] = {}
        for c in self.study.cells:
            meta = self._meta(c) if c.group == cell.group else None
            if meta is not None and meta["history"]:
                paces.setdefault((c.entry.label, c.dataset), []).append(_seconds(meta) / len(meta["history"]))
        pace = {key: float(np.mean(values)) for key, values in paces.items()}
        for (group, label, dataset), seen in self._watched.items():
            if group == cell.group:
                pace.setdefault((label, dataset), seen)
        if epochs and (cell.entry.label, cell.dataset) in pace:  # watched here: no scaling needed
            return epochs * pace[(cell.entry.label, cell.dataset)]
        guesses = []
        for (label, dataset), own in pace.items():
            if label != cell.entry.label or dataset == cell.dataset:
                continue
            ratios = [pace[(other, cell.dataset)] / there for (other, d), there in pace.items()
                      if d == dataset and (other, cell.dataset) in pace and there > 0]
            if ratios:
                guesses.append(own * float(np.median(ratios)))
        return epochs * max(guesses) if epochs and guesses else None

    def may_start(self, cell: Cell, remaining: float) -> bool:
        """False for a cell not yet begun whose other seeds took longer than ``remaining`` (or, none
        of them on its dataset, whose guessed cost exceeds it)."""
        if cell_state(cell, self.study.directory) != "new":
            return True
        took = [_seconds(meta) for meta in self._records(cell, same_dataset=True)]
        if took and max(took) > remaining:
            log.info("cell %s: its other seeds took up to %.0f s, %.0f s are left: for a later slice (--whole-cells)",
                     cell.id, max(took), remaining)
            self.too_long.add(cell.id)
            return False
        guess = None if took else self.guessed_seconds(cell)
        if guess is not None and guess > remaining:
            log.info("cell %s: about %.0f s from its pace on another dataset, %.0f s are left: for a later slice "
                     "(--whole-cells)", cell.id, guess, remaining)
            self.too_long.add(cell.id)
            return False
        return True

    def watch(self, cell: Cell, remaining: float) -> Callable[[dict[str, Any]], str | None] | None:
        """An ``on_epoch`` hook that pauses the cell once its pace (the median seconds of the epochs
        this worker has watched it train) shows it would not finish."""
        epochs = self.expected_epochs(cell)
        if epochs is None:
            return None
        deadline = time.monotonic() + remaining
        spent: list[float] = []

        def on_epoch(row: dict[str, Any]) -> str | None:
            spent.append(row["train_seconds"] + row.get("eval_seconds", 0.0))
            # The median, not the mean: an epoch slowed by other work on the machine (tests, a build)
            # must not pause a cell whose usual pace would finish it.
            pace, left = float(np.median(spent)), deadline - time.monotonic()
            self._watched[(cell.group, cell.entry.label, cell.dataset)] = pace
            if pace * (epochs - row["epoch"]) <= left:
                return None
            self.too_long.add(cell.id)
            return (f"--whole-cells: {epochs - row['epoch']} more epoch(s) at {pace:.0f} s each would not finish in "
                    f"the {left:.0f} s left")

        return on_epoch


def match_runs(study: Study, paths: Iterable[str | Path]) -> list[tuple[Cell, Path]]:
    """The cell each finished run made elsewhere is (same model, dataset and every setting), or each
    record of another study (``*.npz``) whose settings are a cell's here; checked before anything is
    written: a run or record that is no cell, or a record made on other data, is refused."""
    from mlsa4rec.runs.loading import load_run_config, load_run_data

    configs = {cell.id: cell_config(cell, study).to_dict() for cell in study.cells}
    matches = []
    for path in map(Path, paths):
        if not path.exists():
            raise MLSA4RecError(f"--adopt {str(path)!r}: no such file or directory; pass a finished run directory or "
                                "a study record (records/GROUP/MODEL/DATASET/seed-N.npz)")
        is_record = path.suffix == ".npz" and path.is_file()
        record = _adopted_record(path)[0] if is_record else None
        saved = record["settings"] if record is not None else load_run_config(path).to_dict()
        cell = next((c for c in study.cells if configs[c.id] == saved), None)
        what = "record" if is_record else "run"
        if cell is None:
            raise MLSA4RecError(f"{str(path)!r} is no cell of study {study.name!r} (no cell has its model, dataset "
                                f"and settings); adopt only {what}s made with a cell's exact settings")
        if record is not None:  # a run's data is checked when its record is made; a record's, here
            data = load_run_data(cell_config(cell, study), study.data_dir)
            if record.get("data_fingerprint") != data.fingerprint:
                raise MLSA4RecError(f"record {str(path)!r} was made on other data than cell {cell.id} reads now (the "
                                    "data fingerprints differ); train the cell instead")
        matches.append((cell, path.resolve()))
    return matches


def _adopted_record(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Another study's record, checked as ``read_record`` does, with a message for ``--adopt``
    (which never suggests deleting the file: it is not this study's)."""
    try:
        return read_record(path)
    except MLSA4RecError as exc:
        why = str(exc).split(_record_fix(path))[0].replace("study record", "--adopt", 1)
        raise MLSA4RecError(f"{why}: not a study record that can be adopted; pass a records/.../seed-N.npz that "
                            "`mlsa4rec study run` wrote, or a finished run directory") from None


def adopt(study: Study, matches: Iterable[tuple[Cell, Path]]) -> None:
    """Record adopted runs (or copy adopted records) as their cells, so they are not trained again."""
    for cell, path in matches:
        if cell_state(cell, study.directory) == "done":
            continue
        if path.suffix == ".npz" and path.is_file():
            meta, arrays = _adopted_record(path)
            meta = {**meta, "cell": cell.id, "group": cell.group, "model": cell.entry.label,
                    "adopted_from": {"record": str(path), "cell": meta["cell"]}}
            _save_record(cell.record_path(study.directory), meta, arrays)
        else:
            write_record(cell, study, path)
        log.info("adopted %s as cell %s", path, cell.id)


# --- records -----------------------------------------------------------------------------------

def write_record(cell: Cell, study: Study, run_dir: Path | None = None) -> Path:
    """The cell's record from its finished run (its own, or ``run_dir`` adopted): settings, metrics,
    curve, cost, the test target rank of every user under both history rules and the length of
    every user's history before the test item (so a report never needs the run directory)."""
    from mlsa4rec.evaluation.runs import run_ranks
    from mlsa4rec.runs.loading import load_run

    run_dir = run_dir or cell.run_dir(study.directory)
    run = load_run(run_dir, study.data_dir)  # manifest and data fingerprint checked
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    ranks = {rule: run_ranks(run, "test", exclude) for rule, exclude in (("ranked", False), ("excluded", True))}
    # capped, most users' ranks are one byte of 255: a record is tens of KB, not hundreds
    arrays = {f"ranks_{rule}": np.minimum(r, RANK_CAP).astype(np.uint8) for rule, r in ranks.items()}
    targets = run.data.eval_targets("test")  # the users in the ranks' order, for subsets by history length
    lengths = targets - run.data.history_start(targets)
    arrays["history_lengths"] = np.minimum(lengths, np.iinfo(np.uint16).max).astype(np.uint16)
    meta = {"format": RECORD_FORMAT, "cell": cell.id, "group": cell.group, "model": cell.entry.label,
            "dataset": dataset_name(cell.dataset), "seed": cell.seed, "run": str(run_dir),
            "settings": run.config.to_dict(), "valid": results["valid"], "test": results["test"],
            "history": results.get("history", []), "data_fingerprint": results.get("data_fingerprint"),
            **{k: results.get(k) for k in ("best_epoch", "epochs_run", "seconds_per_epoch", "train_seconds",
                                           "parameters", "parameters_non_embedding", "device", "threads",
                                           "git_commit", "versions")},
            "segments": results.get("segments", []),
            "machine": {"cpu": cpu_model(), "device": results.get("device"), "threads": results.get("threads")},
            "peak_memory_kind": "cuda allocated" if str(results.get("device", "")).startswith("cuda")
            else "process resident (CPU)",
            "peak_memory_bytes": max((h.get("peak_memory_bytes") or 0 for h in results.get("history", [])),
                                     default=0) or None,
            "digests": {k: array_digest(v) for k, v in arrays.items()}}
    return _save_record(cell.record_path(study.directory), meta, arrays)


def _save_record(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return path


def _record_fix(path: Path) -> str:
    """What to do with a record that cannot be trusted: records are committed and outlive their run
    directories, so restoring one comes before deleting it."""
    return (f"; restore it (git checkout -- {shlex.quote(str(path))}, where the study directory is committed), or "
            "delete it: it is rebuilt from its run directory where that still exists, else its cell is trained again")


def read_record(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A record, its arrays checked against the digests it carries (a damaged record is refused)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(f["meta"].tobytes().decode())
            arrays = {k: f[k] for k in f.files if k != "meta"}
    except (OSError, ValueError, KeyError, UnicodeDecodeError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise MLSA4RecError(f"study record {str(path)!r} cannot be read ({exc}){_record_fix(path)}") from None
    if meta.get("format") not in (1, RECORD_FORMAT) or any(array_digest(arrays.get(k, np.zeros(0))) != d
                                                  for k, d in meta.get("digests", {}).items()):
        raise MLSA4RecError(f"study record {str(path)!r} is damaged (its arrays do not match their checksums)"
                            f"{_record_fix(path)}")
    return meta, arrays


# --- status ------------------------------------------------------------------------------------

def study_status(root: str | Path, storage: str | None = None) -> list[dict[str, Any]]:
    """One row per cell of the study in ``root``: state, epochs, best validation metric so far, time."""
    from optuna.trial import TrialState

    root = Path(root)
    meta = read_meta(root) if (root / STUDY_JSON).exists() else None
    if meta is None:
        raise MLSA4RecError(f"{str(root)!r} is not a study directory (no {STUDY_JSON}); pass the directory a `mlsa4rec "
                            "study run` made")
    study = load_study(meta["file"], root, check=False)
    url = storage or meta["storage"]
    # a committed study directory on a new machine: its records, no SQLite file yet (none is made here)
    fresh = url == default_storage(root) and not (root / "study.db").is_file()
    trials = [] if fresh else _load_optuna_study(study, url).get_trials(deepcopy=False)
    latest: dict[str, Any] = {}
    rank = {TrialState.RUNNING: 2, TrialState.COMPLETE: 1}  # over a duplicate pruned beside it
    for t in trials:  # in trial order: the newest of equal rank wins
        cell_id = t.user_attrs.get("cell")
        if cell_id is None:
            continue
        if cell_id not in latest or rank.get(t.state, 0) >= rank.get(latest[cell_id].state, 0):
            latest[cell_id] = t
    stale = dict(stale_cells(study))
    rows = []
    for cell in study.cells:
        trial, state = latest.get(cell.id), cell_state(cell, root)
        row = {"cell": cell.id, "state": "waiting", "epochs": None, "metric": None, "seconds": None}
        if cell.id in stale:
            row.update(state="stale", error=f"finished with other settings ({', '.join(stale[cell.id])})")
        elif state == "done":
            rec = read_record(cell.record_path(root))[0]
            row.update(state="done", epochs=rec["epochs_run"], metric=rec["valid"][rec["settings"]["valid_metric"]],
                       seconds=rec["train_seconds"])
        else:
            if trial is not None and trial.state == TrialState.COMPLETE:
                row["state"] = "done elsewhere"  # its record is in another machine's study directory
            elif trial is not None and trial.state == TrialState.RUNNING:
                worker = trial.user_attrs.get(workers.WORKER_ATTR)
                if workers.gone(worker, trial._trial_id):  # killed here: no heartbeat stale yet, nothing trains it
                    row.update(state="paused", error=f"its worker (pid {worker['pid']}) has stopped; `mlsa4rec "
                                                     "study run` continues it from its checkpoint")
                else:
                    row["state"] = "running"
            elif trial is not None and trial.state == TrialState.FAIL:
                row["state"] = "failed"
                row["error"] = trial.user_attrs.get("error")
            elif state == "paused":
                row["state"] = "paused" if trial is None or trial.state != TrialState.WAITING else "waiting"
            progress = _checkpoint_progress(cell.run_dir(root))
            if progress:
                row.update(epochs=progress["epoch"] - 1, seconds=round(progress["train_seconds"], 1),
                           metric=progress["best_score"] if progress["best_epoch"] else None)
        rows.append(row)
    return rows


def _checkpoint_progress(run: Path) -> dict[str, Any] | None:
    from mlsa4rec.runs import checkpoint

    path = directory.staging_dir(run) / checkpoint.CHECKPOINT
    if not path.is_file():
        return None
    try:
        return json.loads(checkpoint.load(path)["meta"])["progress"]
    except MLSA4RecError:
        return None


def format_status(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["cell"]) for r in rows)
    lines = [f"{'cell':<{width}}  {'state':<14} {'epochs':>6} {'valid':>8} {'seconds':>9}"]
    for r in rows:
        metric = "-" if r["metric"] is None else f"{r['metric']:.4f}"
        epochs = "-" if r["epochs"] is None else str(r["epochs"])
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"{r['cell']:<{width}}  {r['state']:<14} {epochs:>6} {metric:>8} {seconds:>9}"
                     + (f"  {r['error']}" if r.get("error") else ""))
    states = ("done", "done elsewhere", "running", "waiting", "paused", "failed", "stale")
    counts = {s: sum(r["state"] == s for r in rows) for s in states}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no cells")
    return "\n".join(lines)
