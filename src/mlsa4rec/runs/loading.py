"""A finished run loaded back: the one loader behind evaluate, compare, serving and export.

A run directory (``directory.py``) is checked against its manifest, its model rebuilt from
``config.yaml`` exactly as training built it (``build_run_model``, which training uses too), its
weights loaded from safetensors (nothing is unpickled), and its data, where it is needed, refused
when it differs from the data the run was trained on. Serving needs no data: the item map comes
from ``items.json`` (a run without one is rebuilt from its data, which must then be found).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from mlsa4rec.config import Config, build_config, load_yaml_file
from mlsa4rec.data import REGISTRY, SequenceData, data_dir_from, duplicates_mismatch, load_dataset, resolve, split_of
from mlsa4rec.data.itemmap import ItemMap
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.models import build_model, get_class
from mlsa4rec.ops.scan import check_environment
from mlsa4rec.runs import directory
from mlsa4rec.runtime import resolve_device, set_seed

log = logging.getLogger("mlsa4rec")


@dataclass
class LoadedRun:
    """A finished run directory rebuilt: its config, item map and model with the saved weights (on
    ``device``, in eval mode), and its data when the load needed it (``None`` otherwise)."""

    path: Path
    config: Config
    data: SequenceData | None
    items: ItemMap
    model: torch.nn.Module
    device: torch.device


def load_run(run_dir: str | Path, data_dir: str | Path | None = None, *, device: str = "auto",
             need_data: bool = True) -> LoadedRun:
    """Rebuild a run directory's model (weights loaded, in eval mode) after checking its files
    against its manifest.

    ``need_data``: load the run's data and refuse data that differs from what the run was trained
    on (evaluation); ``False`` loads it only when the run has no ``items.json`` (serving, export).
    ``device``: ``auto`` is the run's own device, or the best one here when this machine lacks it.
    """
    if need_data:  # scoring runs the scan: a bad MLSA4REC_SCAN is one line before minutes of loading
        check_environment()
    run = Path(run_dir)
    config = load_run_config(run)
    where = run_device(config, run) if device == "auto" else None
    data = None
    if need_data or not (run / directory.ITEMS).is_file():
        data = _trained_data(config, run, data_dir)
        items = ItemMap.from_data(data)
    else:
        items = read_items(run)
    # evaluation seeds as training did; serving leaves the caller's generators alone (the weights
    # are loaded over the initialisation anyway)
    net = build_run_model(config, items.n_items, seeded=need_data)
    load_weights(net, run / directory.WEIGHTS)
    where = where or resolve_device(device)  # a device asked for is checked once the run's files are
    net.to(where).eval()
    return LoadedRun(run, config, data, items, net, where)


def load_run_config(run: Path) -> Config:
    """The run's ``config.yaml``, validated, after its files are checked against the manifest."""
    if not (run / "config.yaml").is_file():
        directory.warn_replaced_leftovers(run)  # an interrupted --overwrite may have left the old run hidden
        raise MLSA4RecError(f"{str(run)!r} is not a run directory (no config.yaml); pass the --output-dir of a "
                            "finished `mlsa4rec train`")
    directory.verify_run(run)
    saved = load_yaml_file(run / "config.yaml")
    if "model" not in saved or "dataset" not in saved:
        raise MLSA4RecError(f"{str(run / 'config.yaml')!r} lacks the model or dataset entry")
    get_class(str(saved["model"]))
    return build_config(str(saved["model"]), [run / "config.yaml"], extra={"dataset": saved["dataset"]})


def read_items(run: Path) -> ItemMap:
    """The run's item map from ``items.json`` (already checked against the manifest)."""
    path = run / directory.ITEMS
    try:
        return ItemMap.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MLSA4RecError(f"{str(path)!r} is damaged ({type(exc).__name__}); train the run again") from None


def _trained_data(config: Config, run: Path, data_dir: str | Path | None) -> SequenceData:
    """The run's data, found where the command says or where the run found it, and refused when it
    is not the data the run was trained on (its fingerprint in results.json)."""
    try:
        recorded = json.loads((run / "results.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    if data_dir_from(data_dir) is None and recorded.get("data_dir"):
        data_dir = recorded["data_dir"]  # where the run found its data
    data = load_run_data(config, data_dir)
    if why := duplicates_mismatch(data, recorded.get("data_fingerprint"), f"run {str(run)!r}"):
        raise MLSA4RecError(why)
    if recorded.get("data_fingerprint") not in (None, data.fingerprint):
        raise MLSA4RecError(data_mismatch_message(config, data, data_dir, recorded))
    return data


def build_run_model(config: Config, n_items: int, device: torch.device | str | None = None, seeded: bool = True):
    """The run's model (``seeded``: initialised from the run's seed, as training starts it); on the
    ``meta`` device it costs nothing (for size estimates)."""
    if seeded:
        set_seed(config.train.seed)
    # unseeded, the initialisation draws from a copy of the generator: the caller's stream is untouched
    with (contextlib.nullcontext() if seeded else torch.random.fork_rng(devices=[])), \
            (torch.device(device) if device is not None else contextlib.nullcontext()):
        return build_model(get_class(config.model), n_items, config.model_kwargs(), config.train.max_seq_length)


def load_run_data(config: Config, data_dir: str | Path | None) -> SequenceData:
    """The run's dataset, filtered and split as its settings say (the cache verifies itself): every
    reader of a run (training, ``load_run``, evaluation, records, serving's item map) sees the same
    users and targets."""
    t = config.train
    return load_dataset(config.dataset, data_dir, t.user_inter_num_interval, t.item_inter_num_interval,
                        duplicate_events=t.duplicate_events).with_split(split_of(t))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise MLSA4RecError(f"weights file {str(path)!r} is missing; is this a finished run directory?")
    try:
        state = safetensors.torch.load_file(str(path))
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise MLSA4RecError(f"weights file {str(path)!r} is corrupt or not safetensors ({exc}); retrain or "
                            "restore the file") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MLSA4RecError(f"weights in {str(path)!r} do not fit the model in config.yaml: {first}") from None


def data_mismatch_message(config: Config, data: SequenceData, data_dir: str | Path | None,
                          recorded: Mapping[str, Any]) -> str:
    """Why the data found for a run is not the data it was trained on, and what to do. Runs since
    0.2 record the data file's SHA-256 (``data_sha256`` in results.json); older ones record only
    a fingerprint of file and filtering together, so the two causes cannot be told apart."""
    dataset = config.dataset
    where = ("point --data-dir at the original files" if dataset in REGISTRY
             else f"restore the original file at {dataset!r}")
    path, digest = resolve(dataset, data_dir)[1], data.file_sha256  # the load's own checksum: no second read
    trained_on = recorded.get("data_sha256")
    if not isinstance(trained_on, str):
        return (f"the data found for {dataset!r} ({str(path)!r}) differs from the data this run was trained on "
                "(its file or filtering differ; the run's results.json predates data_sha256, so it records no "
                f"checksum of the file itself); {where}")
    if digest != trained_on:
        return (f"the data file {str(path)!r} differs from the data this run was trained on: its SHA-256 is "
                f"{digest[:16]}..., results.json records data_sha256 {trained_on[:16]}...; {where} (any file with "
                "that SHA-256 will do)")
    versions = recorded.get("versions")
    version = versions.get("mlsa4rec") if isinstance(versions, dict) else None
    return (f"the data file {str(path)!r} is the one this run was trained on (same SHA-256), but it is now "
            "processed differently (this mlsa4rec version's reader or filtering changed); evaluate the run with "
            f"the mlsa4rec version that trained it ({version or 'see results.json'})")


def run_device(config: Config, run: Path) -> torch.device:
    """Where a finished run is scored: the device it trained with, or, on a machine without that
    device (a run trained on a GPU, scored on a laptop), the best one here, with a warning."""
    try:
        return resolve_device(config.train.device)
    except MLSA4RecError:
        device = resolve_device("auto")
        log.warning("%s was trained with device=%s, which this machine does not have; it is scored on %s", run,
                    config.train.device, device)
        return device
