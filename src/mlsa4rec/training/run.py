"""A run directory: everything needed to reload, re-evaluate and cite one training run.

    config.yaml        every setting, plus the model and dataset names
    results.json       valid and test metrics, epochs, times, parameter counts, versions, commit
    model.safetensors  the best weights (plain tensors: no pickled code is ever loaded)
    train.log          the per-epoch log lines

The directory is built under a hidden sibling name and renamed into place only when the run has
finished, so a crash, a Ctrl-C or bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

import mlsa4rec
from mlsa4rec.config import Config, build_config, load_yaml_file
from mlsa4rec.data import REGISTRY, SequenceData, data_dir_from, load_dataset
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation import evaluate_split
from mlsa4rec.fileio import current_umask, write_atomic, write_json_atomic, write_yaml_atomic
from mlsa4rec.models import build_model, get_class
from mlsa4rec.training.trainer import Trainer, set_seed

log = logging.getLogger("mlsa4rec")

WEIGHTS = "model.safetensors"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MLSA4RecError(f"device {name!r} was asked for but CUDA is not available; use device=cpu")
    return torch.device(name)


def git_commit() -> str | None:
    """The commit of the source tree this package runs from, with '+dirty' if it has changes."""
    here = Path(mlsa4rec.__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    return {"mlsa4rec": mlsa4rec.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__}


def build_run_model(config: Config, data: SequenceData):
    set_seed(config["seed"])
    return build_model(get_class(config["model"]), data.n_items, config.model_kwargs(), config["MAX_ITEM_LIST_LENGTH"])


def load_run_data(config: Config, data_dir: str | Path | None) -> SequenceData:
    return load_dataset(config["dataset"], data_dir, config["user_inter_num_interval"],
                        config["item_inter_num_interval"])


def _check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to touch anything but a missing or empty directory, or (with --overwrite) a run."""
    if not out.exists():
        return
    if not out.is_dir():
        raise MLSA4RecError(f"output path {str(out)!r} exists and is not a directory; choose another --output-dir")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise MLSA4RecError(f"output directory {str(out)!r} already exists and is not empty; choose another "
                            "--output-dir or pass --overwrite")
    if not (out / "config.yaml").is_file():
        raise MLSA4RecError(f"--overwrite only replaces a run directory (one holding config.yaml); "
                            f"{str(out)!r} is not one, so it was left alone")


def train(
    model: str,
    dataset: str,
    output_dir: str | Path,
    config_files: list[str | Path] = (),
    overrides: dict[str, Any] | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``model`` on ``dataset``, evaluate the best epoch on valid and test, save the run."""
    get_class(model)  # unknown model: fail before anything else
    out = Path(output_dir)
    if dataset not in REGISTRY and Path(dataset).is_file():
        dataset = str(Path(dataset).resolve())  # so that `evaluate` works from any directory
    config = build_config(model, config_files, overrides, extra={"dataset": str(dataset)})
    _check_output_dir(out, overwrite)
    device = resolve_device(config["device"])
    t0 = time.perf_counter()
    data = load_run_data(config, data_dir)
    data_seconds = time.perf_counter() - t0
    stats = data.stats()
    log.info("dataset %s: %d users, %d items, %d interactions (%.2f s)", stats["dataset"], stats["users"],
             stats["items"], stats["interactions"], data_seconds)
    net = build_run_model(config, data)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        os.chmod(stage, 0o777 & ~current_umask())
    except OSError as exc:
        raise MLSA4RecError(f"cannot create the output directory {str(out)!r}: {exc.strerror}") from None
    handler = logging.FileHandler(stage / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    old_level = log.level
    if log.getEffectiveLevel() > logging.INFO:  # library use without logging set up: still fill train.log
        log.setLevel(logging.INFO)
    try:
        write_yaml_atomic(stage / "config.yaml", config.to_dict())

        def save_best(m: torch.nn.Module, epoch: int) -> None:
            write_atomic(stage / WEIGHTS, lambda tmp: safetensors.torch.save_file(
                {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, str(tmp),
                metadata={"model": model, "epoch": str(epoch)}))

        trainer = Trainer(net, data, config, device, on_improve=save_best)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        fit = trainer.fit()
        valid, test = trainer.evaluate("valid"), trainer.evaluate("test")
        results = {
            "model": model,
            "dataset": stats,
            "data_fingerprint": data.fingerprint,
            "data_dir": str(Path(d).resolve()) if (d := data_dir_from(data_dir)) else None,
            "data_source": data.source,
            "train_scheme": trainer.scheme,
            "valid": valid,
            "test": test,
            "best_epoch": fit.best_epoch,
            "epochs_run": fit.epochs_run,
            "stopped_early": fit.stopped_early,
            "seconds_per_epoch": round(fit.seconds_per_epoch, 3),
            "train_seconds": round(fit.train_seconds, 3),
            "eval_seconds": round(fit.eval_seconds, 3),
            "data_seconds": round(data_seconds, 3),
            "parameters": net.num_parameters(),
            "parameters_non_embedding": net.num_parameters(exclude_embeddings=True),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "started": started,
            "versions": versions(),
            "git_commit": git_commit(),
            "history": fit.history,
        }
        write_json_atomic(stage / "results.json", results)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(old_level)
    try:
        _check_output_dir(out, overwrite)  # again: something may have appeared there meanwhile
    except MLSA4RecError as exc:
        raise MLSA4RecError(f"{exc}; the finished run is kept in {str(stage)!r}") from None
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
    log.info("saved run to %s", out)
    return results


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


def evaluate_run(run_dir: str | Path, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Re-evaluate a run directory's saved weights on valid and test."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise MLSA4RecError(f"{str(run)!r} is not a run directory (no config.yaml); pass the --output-dir of a "
                            "finished `mlsa4rec train`")
    saved = load_yaml_file(run / "config.yaml")
    if "model" not in saved or "dataset" not in saved:
        raise MLSA4RecError(f"{str(run / 'config.yaml')!r} lacks the model or dataset entry")
    config = build_config(saved["model"], [run / "config.yaml"], extra={"dataset": saved["dataset"]})
    try:
        recorded = json.loads((run / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        recorded = {}
    if data_dir_from(data_dir) is None and recorded.get("data_dir"):
        data_dir = recorded["data_dir"]  # where the run found its data
    data = load_run_data(config, data_dir)
    if recorded.get("data_fingerprint") not in (None, data.fingerprint):
        raise MLSA4RecError(
            f"the data found for {config['dataset']!r} differs from the data this run was trained on "
            "(checksum or filtering differ); point --data-dir at the original file"
        )
    net = build_run_model(config, data)
    load_weights(net, run / WEIGHTS)
    device = resolve_device(config["device"])
    net.to(device)
    return {"model": config["model"], "dataset": config["dataset"],
            "valid": evaluate_split(net, data, "valid", config, device),
            "test": evaluate_split(net, data, "test", config, device)}


def format_table(results: dict[str, Any]) -> str:
    """Valid and test metrics as an aligned text table."""
    keys = list(results["test"])
    width = max(len(k) for k in keys) + 2
    lines = ["split".ljust(8) + "".join(k.rjust(width) for k in keys)]
    for split in ("valid", "test"):
        lines.append(split.ljust(8) + "".join(f"{results[split][k]:.4f}".rjust(width) for k in keys))
    return "\n".join(lines)
