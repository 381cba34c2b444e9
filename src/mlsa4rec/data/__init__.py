"""Data: readers, the dataset registry, processing into sequences, and batch samplers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mlsa4rec.data.dataset import (
    DEFAULT_INTERVAL,
    DUPLICATE_RULES,
    LeaveOneOut,
    SequenceData,
    SplitRule,
    TimeSplit,
    cache_dir,
    duplicates_mismatch,
    load_sequences,
    split_rule,
)
from mlsa4rec.data.readers import READERS, Interactions, detect_format, read_error, read_interactions
from mlsa4rec.data.registry import REGISTRY, DatasetSpec, data_dir_from, get_spec, locate
from mlsa4rec.errors import DataError

log = logging.getLogger(__name__)


__all__ = [
    "DEFAULT_INTERVAL", "DUPLICATE_RULES", "READERS", "REGISTRY", "DatasetSpec", "Interactions", "LeaveOneOut",
    "SequenceData", "SplitRule", "TimeSplit", "data_dir_from", "detect_format", "duplicates_mismatch", "load_dataset",
    "read_interactions", "resolve", "split_of", "split_rule",
]


def resolve(dataset: str, data_dir: str | Path | None = None) -> tuple[str, Path, str, DatasetSpec | None]:
    """Name, file, reader and registry entry (None for a plain path) of ``dataset``."""
    if dataset in REGISTRY:
        spec = get_spec(dataset)
        path, fmt = locate(spec, data_dir_from(data_dir), cache_dir())
        return spec.name, path, fmt, spec
    path = Path(dataset)
    if path.is_dir():
        raise DataError(f"--dataset {dataset!r} is a directory, not a data file; pass the file inside it (.inter, "
                        "ratings.dat, .csv or .txt[.gz]), or a registered name with --data-dir pointing at it")
    if path.is_file():
        name = path.name.split(".")[0] or "dataset"
        return name, path, detect_format(path), None
    if "/" in dataset or os.sep in dataset or path.suffix:
        raise DataError(f"data file {dataset!r} does not exist (and it is not a registered dataset name)")
    get_spec(dataset)  # raises the "unknown dataset" error with a suggestion
    raise AssertionError("unreachable")


def load_dataset(
    dataset: str,
    data_dir: str | Path | None = None,
    user_inter_num_interval: str = DEFAULT_INTERVAL,
    item_inter_num_interval: str = DEFAULT_INTERVAL,
    use_cache: bool = True,
    duplicate_events: str = "drop",
    split: SplitRule | None = None,
) -> SequenceData:
    """A registered dataset name or a data file path, deduplicated, filtered, remapped and sorted;
    split leave-one-out, or by ``split`` (``split_rule``: a time split, checked against the data)."""
    name, path, fmt, spec = resolve(dataset, data_dir)
    try:
        data = load_sequences(path, fmt, name, user_inter_num_interval, item_inter_num_interval, use_cache,
                              duplicate_events)
    except OSError as exc:  # the file is there but may not be read (permissions, a disk error)
        raise read_error(Path(exc.filename) if exc.filename else path, exc) from None
    if spec is not None and (user_inter_num_interval, item_inter_num_interval) == (DEFAULT_INTERVAL,) * 2:
        got = (data.n_users, data.n_items, data.n_interactions)
        if got != spec.expected:
            log.warning("%s from %s has %s users/items/interactions; the reference counts are %s",
                        name, path, got, spec.expected)
    return data if split is None else data.with_split(split)


def split_of(settings: object) -> SplitRule:
    """The split rule of a run's settings (a ``TrainConfig``: ``split``, ``valid_time``, ``test_time``)."""
    return split_rule(getattr(settings, "split", "leave_one_out"), getattr(settings, "valid_time", None),
                      getattr(settings, "test_time", None))
