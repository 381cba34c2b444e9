"""A run directory: everything needed to reload, re-evaluate and cite one training run.

    config.yaml        every setting, plus the model and dataset names
    results.json       valid and test metrics, epochs, times, parameter counts, versions, commit
    model.safetensors  the best weights (plain tensors: no pickled code is ever loaded)
    train.log          the per-epoch log lines

The directory is built under the hidden sibling ``.NAME.partial/`` and renamed into place only
when the run has finished, so a crash, a Ctrl-C or bad input never leaves a half-written run
behind. While it trains, that directory also holds ``checkpoint.pt`` (every epoch, and every
``checkpoint_steps`` steps); a run that dies after its first checkpoint leaves it there, and
``train ... --resume`` continues from it. A run that fails before then leaves nothing.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from mlsa4rec.evaluation import evaluate_split, split_ranks
from mlsa4rec.evaluation.significance import check_confidence, compare_ranks, holm
from mlsa4rec.fileio import current_umask, write_atomic, write_json_atomic, write_yaml_atomic
from mlsa4rec.metrics import parse_metric
from mlsa4rec.models import build_model, get_class
from mlsa4rec.training import checkpoint, distributed
from mlsa4rec.training.distributed import DistContext
from mlsa4rec.training.trainer import Trainer, set_seed

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs of one --output-dir are not detected
    fcntl = None

log = logging.getLogger("mlsa4rec")

WEIGHTS = "model.safetensors"


def resolve_device(name: str) -> torch.device:
    return distributed.single_device(name)


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


def staging_dir(out: Path) -> Path:
    """Where the run to ``out`` is built and its checkpoint kept until it finishes: a fixed hidden
    sibling, so that an interrupted run can be found again by ``--resume``."""
    return out.parent / f".{out.name}.partial"


class _StageLock:
    """An exclusive ``flock`` on the staging directory, held while a process writes it, so that a
    second run (or a second --resume) of the same --output-dir cannot write or delete it at the
    same time. The kernel drops it when the process dies, even by SIGKILL."""

    def __init__(self, stage: Path) -> None:
        self.path = stage / ".lock"
        self.handle = open(self.path, "a")  # noqa: SIM115 - held for the whole run
        if fcntl is None:
            return
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise MLSA4RecError(f"another mlsa4rec process is writing {str(stage)!r} (a run of the same --output-dir "
                                "is in progress); wait for it to finish or stop it") from None

    def release(self, remove: bool = False) -> None:
        if remove:
            self.path.unlink(missing_ok=True)
        self.handle.close()


def _open_stage(out: Path, overwrite: bool, resume: bool, dry: bool = False) -> tuple[Path, _StageLock | None, bytes]:
    """Check the output and staging directories, then create (fresh run) or lock (resume) the
    staging directory; with ``resume`` also return the verified checkpoint payload. ``dry``
    only checks (and then holds no lock). Runs on rank 0 only."""
    stage = staging_dir(out)
    if resume and not stage.exists() and (out / "config.yaml").is_file():
        raise MLSA4RecError(f"nothing to resume: the run in {str(out)!r} has finished (only an interrupted run, "
                            f"kept in {str(stage)!r}, can be resumed)")
    _check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MLSA4RecError(f"cannot create the output directory {str(out)!r}: {exc.strerror}") from None
    if not (stage.exists() or stage.is_symlink()):
        if resume:
            raise MLSA4RecError(f"nothing to resume: no interrupted run of {str(out)!r} (it would be in "
                                f"{str(stage)!r}); run the command without --resume")
        if dry:
            return stage, None, b""
        try:
            stage.mkdir()
            os.chmod(stage, 0o777 & ~current_umask())
        except OSError as exc:
            raise MLSA4RecError(f"cannot create the output directory {str(out)!r}: {exc.strerror}") from None
        return stage, _StageLock(stage), b""
    if not stage.is_dir() or stage.is_symlink():
        raise MLSA4RecError(f"{str(stage)!r} (the staging place of {str(out)!r}) exists and is not a directory; "
                            "move it away")
    lock = _StageLock(stage)
    try:
        has_checkpoint = (stage / checkpoint.CHECKPOINT).is_file()
        if resume:
            if not has_checkpoint:
                raise MLSA4RecError(f"nothing to resume: the interrupted run in {str(stage)!r} stopped before its "
                                    "first checkpoint; run the command without --resume to start over")
            payload = checkpoint.verified_payload(stage / checkpoint.CHECKPOINT)
            if not dry:  # temporary files of writes cut short by the crash
                for leftover in stage.glob(".*.tmp"):
                    leftover.unlink()
        elif has_checkpoint and not overwrite:
            raise MLSA4RecError(f"an interrupted run of {str(out)!r} is kept in {str(stage)!r}; pass --resume to "
                                "continue it from its last checkpoint, or --overwrite to start over")
        else:  # debris of a run that died before its first checkpoint, or --overwrite: start afresh
            payload = b""
            if not dry:
                for entry in stage.iterdir():
                    if entry != lock.path:
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    except BaseException:
        lock.release()
        raise
    if dry:
        lock.release()
        return stage, None, payload
    return stage, lock, payload


def preflight(model: str, dataset: str, output_dir: str | Path, config_files: list[str | Path] = (),
              overrides: dict[str, Any] | None = None, data_dir: str | Path | None = None, overwrite: bool = False,
              resume: bool = False, world_size: int = 1) -> None:
    """Every check ``train`` makes before it starts, without writing anything but the dataset
    cache: lets ``--nproc`` report bad input as one clear error before it launches processes."""
    get_class(model)
    dataset = _resolve_dataset(dataset)
    config = build_config(model, config_files, overrides, extra={"dataset": str(dataset)})
    if world_size > 1:
        distributed.device_for(config["device"], 0)
    out = Path(output_dir)
    _, _, payload = _open_stage(out, overwrite, resume, dry=True)
    data = load_run_data(config, data_dir)
    if payload:
        checkpoint.check_resumable(checkpoint.decode(payload), config.to_dict(), data.fingerprint, world_size,
                                   str(staging_dir(out) / "config.yaml"))


def _resolve_dataset(dataset: str) -> str:
    if dataset not in REGISTRY and Path(dataset).is_file():
        return str(Path(dataset).resolve())  # so that `evaluate` works from any directory
    return dataset


def train(
    model: str,
    dataset: str,
    output_dir: str | Path,
    config_files: list[str | Path] = (),
    overrides: dict[str, Any] | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``dataset``, evaluate the best epoch on valid and test, save the run.

    Under torchrun every rank calls this; rank 0 alone writes files. ``resume`` continues the
    interrupted run of ``output_dir`` from its checkpoint. ``on_step(epoch, step)`` is called
    after every optimiser step (progress reporting, tests).
    """
    get_class(model)  # unknown model: fail before anything else
    dataset = _resolve_dataset(dataset)
    config = build_config(model, config_files, overrides, extra={"dataset": str(dataset)})
    group, device = distributed.init(config["device"], config["dist_timeout"])
    old_level = log.level
    if not group.is_main:
        log.setLevel(logging.WARNING)  # the other ranks only warn; rank 0 tells the story
    elif log.getEffectiveLevel() > logging.INFO:  # library use without logging set up: still fill train.log
        log.setLevel(logging.INFO)
    try:
        return _train(model, Path(output_dir), config, data_dir, overwrite, resume, on_step, group, device)
    finally:
        log.setLevel(old_level)
        distributed.destroy(group)


def _train(model: str, out: Path, config: Config, data_dir: str | Path | None, overwrite: bool, resume: bool,
           on_step: Callable[[int, int], None] | None, group: DistContext, device: torch.device) -> dict[str, Any]:
    opened: dict[str, Any] = {}

    def open_stage() -> bytes:
        opened["stage"], opened["lock"], payload = _open_stage(out, overwrite, resume)
        return payload

    payload = group.run_on_main(open_stage)
    stage: Path | None = opened.get("stage")
    lock: _StageLock | None = opened.get("lock")
    handler = None
    training = False  # past the resume checks: a failure from here on keeps the checkpoint with a hint
    try:
        if stage is not None:
            handler = logging.FileHandler(stage / "train.log", encoding="utf-8")  # appends on resume
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(handler)
        t0 = time.perf_counter()
        data = load_run_data(config, data_dir)
        data_seconds = time.perf_counter() - t0
        stats = data.stats()
        log.info("dataset %s: %d users, %d items, %d interactions (%.2f s)", stats["dataset"], stats["users"],
                 stats["items"], stats["interactions"], data_seconds)
        state = checkpoint.decode(payload, "the checkpoint") if resume else None
        if state is not None:
            changed = checkpoint.check_resumable(state, config.to_dict(), data.fingerprint, group.world_size,
                                                 str(staging_dir(out) / "config.yaml"))
            log.info("resuming the interrupted run in %s%s", staging_dir(out),
                     f" with changed settings: {'; '.join(changed)}" if changed else "")
        if stage is not None:
            write_yaml_atomic(stage / "config.yaml", config.to_dict())
        net = build_run_model(config, data)

        def save_best(m: torch.nn.Module, epoch: int) -> None:
            write_atomic(stage / WEIGHTS, lambda tmp: safetensors.torch.save_file(
                {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, str(tmp),
                metadata={"model": model, "epoch": str(epoch)}))

        def save_checkpoint(training_state: dict[str, Any]) -> None:
            checkpoint.save(stage / checkpoint.CHECKPOINT, training_state)

        trainer = Trainer(net, data, config, device, on_improve=save_best, group=group,
                          on_checkpoint=save_checkpoint, on_step=on_step)
        if state is not None:
            trainer.load_state_dict(state)
            del state, payload
        training = True
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        commit = git_commit()  # the code that trains, not whatever HEAD is when the run ends
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
            "world_size": group.world_size,
            "resumed": bool(resume),
            "started": started,
            "versions": versions(),
            "git_commit": commit,
            "history": fit.history,
        }
        if stage is not None:
            write_json_atomic(stage / "results.json", results)
    except BaseException as exc:
        if stage is not None:
            _after_failure(exc, stage, lock, training)
        raise
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
    if stage is None:
        return results
    (stage / checkpoint.CHECKPOINT).unlink(missing_ok=True)  # the run is complete: nothing to resume
    lock.release(remove=True)
    try:
        _check_output_dir(out, overwrite)  # again: something may have appeared there meanwhile
    except MLSA4RecError as exc:
        raise MLSA4RecError(f"{exc}; the finished run is kept in {str(stage)!r}") from None
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
    log.info("saved run to %s", out)
    return results


def _after_failure(exc: BaseException, stage: Path, lock: _StageLock, training: bool) -> None:
    """Rank 0, when a run fails: keep the staging directory if it holds a checkpoint (and say
    how to resume), otherwise remove it, so that a failure never leaves debris behind."""
    lock.release()
    if not (stage / checkpoint.CHECKPOINT).is_file():
        shutil.rmtree(stage, ignore_errors=True)
        return
    if not training:
        return  # the resume checks failed: the interrupted run stays as it was
    hint = (f"the last checkpoint is kept in {str(stage)!r}: rerun the same command with --resume to continue from "
            "it, or with --overwrite to start over")
    if isinstance(exc, MLSA4RecError):
        exc.args = (f"{exc}; {hint}",)
    else:
        log.warning("%s", hint)


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


@dataclass
class LoadedRun:
    """A finished run directory rebuilt: its config, its data and its model with the saved weights."""

    path: Path
    config: Config
    data: SequenceData
    model: torch.nn.Module
    device: torch.device


def load_run(run_dir: str | Path, data_dir: str | Path | None = None) -> LoadedRun:
    """Rebuild a run directory's data and model (weights loaded, on the run's device, in eval mode),
    refusing data that differs from what the run was trained on."""
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
    net.to(device).eval()
    return LoadedRun(run, config, data, net, device)


def evaluate_run(run_dir: str | Path, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Re-evaluate a run directory's saved weights on valid and test."""
    run = load_run(run_dir, data_dir)
    return {"model": run.config["model"], "dataset": run.config["dataset"],
            **{split: evaluate_split(run.model, run.data, split, run.config, run.device)
               for split in ("valid", "test")}}


def run_ranks(run: LoadedRun, split: str = "test") -> np.ndarray:
    """The target rank of every user of ``split``, in user order, exactly as the run's evaluation
    ranks them (same L, padding, batch size and history rule)."""
    c = run.config
    return split_ranks(run.model, run.data, split, c["MAX_ITEM_LIST_LENGTH"], c["eval_batch_size"],
                       c["exclude_history"], run.device)


def compare_runs(run_dirs: list[str | Path], split: str = "test",
                 metrics: tuple[str, ...] = ("hit@10", "ndcg@10", "mrr@10"), data_dir: str | Path | None = None,
                 confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Every run after the first against the first (the baseline), paired over the users of ``split``:
    relative difference, bootstrap interval, t-test p-value, Holm-adjusted over all rows."""
    if len(run_dirs) < 2:
        raise MLSA4RecError("compare needs a baseline run directory and at least one more")
    for metric in metrics:  # bad settings fail before minutes of scoring, not after
        parse_metric(metric)
    check_confidence(confidence)
    runs, ranks = [], []
    for path in run_dirs:
        run = load_run(path, data_dir)
        if runs and run.data.fingerprint != runs[0].data.fingerprint:
            raise MLSA4RecError(f"{str(path)!r} was trained on other data than {str(runs[0].path)!r} (dataset, file "
                                "or filtering differ); a paired comparison needs the same users")
        ranks.append(run_ranks(run, split))
        run.model.cpu()  # free an accelerator for the next run
        runs.append(run)
    rows = holm([compare_ranks(ranks[0], r, m, confidence, n_resamples, seed) for r in ranks[1:] for m in metrics])
    describe = [{"run": str(r.path), "model": r.config["model"], "variant": r.config.to_dict().get("variant")}
                for r in runs]
    return {"dataset": runs[0].config["dataset"], "split": split, "users": len(ranks[0]), "baseline": describe[0],
            "comparisons": [{**describe[1 + i // len(metrics)], **row.to_dict()} for i, row in enumerate(rows)]}


def format_comparison(result: dict[str, Any]) -> str:
    """``compare_runs``' result as an aligned text table."""
    def label(r: dict[str, Any]) -> str:
        return r["run"] + f" ({r['model']}{', ' + r['variant'] if r['variant'] else ''})"

    base = result["baseline"]
    ci_head = f"{result['comparisons'][0]['confidence']:.0%} CI"
    lines = [f"{result['split']} split of {result['dataset']}, {result['users']:,} users; baseline: {label(base)}",
             f"{'metric':<9} {'baseline':>9} {'run':>9} {'rel. diff':>9}  {ci_head:<18} "
             f"{'p (t-test)':>10} {'p (Holm)':>9}"]
    current = None
    for row in result["comparisons"]:
        if row["run"] != current:
            current = row["run"]
            lines.append(label(row))
        ci = f"[{row['ci_low']:+.1%}, {row['ci_high']:+.1%}]"
        lines.append(f"{row['metric']:<9} {row['baseline']:>9.4f} {row['candidate']:>9.4f} {row['relative']:>+9.1%}  "
                     f"{ci:<18} {row['p_value']:>10.2g} {row['p_holm']:>9.2g}")
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    """Valid and test metrics as an aligned text table."""
    keys = list(results["test"])
    width = max(len(k) for k in keys) + 2
    lines = ["split".ljust(8) + "".join(k.rjust(width) for k in keys)]
    for split in ("valid", "test"):
        lines.append(split.ljust(8) + "".join(f"{results[split][k]:.4f}".rjust(width) for k in keys))
    return "\n".join(lines)
