"""Training runs end to end: settings checked, data loaded, the model trained, the run published.

A run directory holds ``config.yaml``, ``results.json``, ``model.safetensors``, ``items.json``,
``train.log`` (ending with the best epoch's valid and test metrics), ``tensorboard/`` when TensorBoard
tracks the run (``training.tracking``) and ``manifest.json`` (the SHA-256 of each); ``runs.directory``
builds it in a hidden staging directory, publishes it when the run has finished and decides what
may ever be deleted. While a run trains, the staging directory also holds ``checkpoint.pt`` (every
epoch, and every ``checkpoint_steps`` steps); a run that dies after its first checkpoint leaves it
there, and ``train ... --resume`` continues from it. A run that fails before then leaves nothing.
Finished runs are loaded back, re-evaluated and compared by ``evaluation/runs.py`` through
``runs.loading``.
"""

from __future__ import annotations

import functools
import logging
import platform
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

import mlsa4rec
from mlsa4rec.config import Config, build_config
from mlsa4rec.data import REGISTRY, SequenceData, data_dir_from
from mlsa4rec.data.itemmap import ItemMap
from mlsa4rec.errors import MLSA4RecError, RunStopped, TimeBudgetSpent
from mlsa4rec.evaluation.evaluator import evaluation_bytes
from mlsa4rec.models import get_class
from mlsa4rec.ops.scan import check_environment
from mlsa4rec.runs import checkpoint, directory
from mlsa4rec.runs.loading import build_run_model, load_run_data
from mlsa4rec.runtime import resolve_device
from mlsa4rec.training import distributed
from mlsa4rec.training.distributed import DistContext
from mlsa4rec.training.losses import check_loss_memory, loss_memory_bytes, targets_per_step
from mlsa4rec.training.tracking import MLFLOW_RUN_FILE, Trackers, check_tracking, start_trackers, status_for
from mlsa4rec.training.trainer import FitResult, NonFiniteLoss, Trainer

log = logging.getLogger("mlsa4rec")


@functools.cache
def git_commit() -> str | None:
    """The commit of the source tree this package runs from, with '+dirty' if it has changes, as it
    was at this process's first call: a long-lived worker (a study, a tuning) runs the code it
    imported when it started, not whatever HEAD is when its next run starts."""
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


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(config: Config, data: SequenceData, device: torch.device, world_size: int = 1) -> None:
    """Refuse a run that cannot fit before anything large is allocated.

    First the loss alone (``losses.check_loss_memory``): a full softmax over a catalog too large
    for this device is refused with the sampled loss that fits (``--set loss_type=sampled_softmax
    --set negatives=1024``); ``world_size`` ranks each take their share of a step's targets.
    Then the whole run. That estimate is a floor, never an overestimate: parameters with their
    gradient and Adam's two moments (the model is built on the ``meta`` device, so this costs
    nothing), plus the larger of one training batch (its item ids, one hidden-state tensor and the
    score rows the loss holds at once: for CE a chunk of 256 targets in the fused CPU loss, every
    target elsewhere; for a sampled loss its ``loss_memory_bytes``) and one evaluation batch's
    full-ranking scores.
    """
    try:
        net = build_run_model(config, data.n_items, device="meta")
    except RuntimeError as exc:  # sizes whose byte count overflows 64 bits
        raise MLSA4RecError(f"this run's model is larger than any amount of memory ({str(exc).splitlines()[0]}); "
                            "lower hidden_size, MAX_ITEM_LIST_LENGTH or train_batch_size with --set KEY=VALUE"
                            ) from None
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    scheme = config.train.train_scheme if config.train.train_scheme != "auto" else net.preferred_scheme
    length = config.train.max_seq_length
    width = min(length, data.stats()["max_length"]) if net.padding_invariant else length
    batch = config.train.train_batch_size
    targets = batch * width if scheme == "all_positions" else batch
    score_rows = min(targets, 256) if device.type == "cpu" else targets
    hidden = int(getattr(config.hyper, "hidden_size", 64))
    columns = data.n_items + 1
    t = config.train
    free = available_memory(device)
    per_rank = -(-targets_per_step(scheme, batch, width, float(getattr(config.hyper, "mask_ratio", 0.0)))
                 // max(world_size, 1))
    check_loss_memory(free, loss_type=t.loss_type, device=str(device), n_items=data.n_items, hidden_size=hidden,
                      targets=per_rank, negatives=t.negatives, sampler=t.negative_sampler)
    loss_bytes = score_rows * columns * 4 if str(t.loss_type).lower() == "ce" else loss_memory_bytes(
        t.loss_type, device.type, data.n_items, hidden, targets, t.negatives, t.negative_sampler)
    step_bytes = max(batch * width * (8 + 4 * hidden) + loss_bytes,
                     evaluation_bytes(config.train.eval_batch_size, columns, config.train.eval_item_chunk))
    need = 4 * param_bytes + step_bytes
    if free is not None and need > free:
        raise MLSA4RecError(
            f"this run needs at least {_gib(need)} of memory on {device} (parameters, gradients and Adam state "
            f"{_gib(4 * param_bytes)}, one batch {_gib(step_bytes)}) but {_gib(free)} is available; lower "
            "hidden_size, MAX_ITEM_LIST_LENGTH, train_batch_size or eval_batch_size with --set, e.g. --set "
            f"train_batch_size={max(1, batch // 2)}")


_OOM_MARKS = ("can't allocate memory", "not enough memory", "out of memory")


def as_user_error(exc: BaseException) -> BaseException:
    """Running out of memory or disk is a limit of the machine, not a bug: say so in one line."""
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                        and any(m in str(exc).lower() for m in _OOM_MARKS)):
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return MLSA4RecError(f"ran out of memory ({first}); lower train_batch_size, eval_batch_size, hidden_size "
                             "or MAX_ITEM_LIST_LENGTH with --set KEY=VALUE")
    return exc


def preflight(model: str, dataset: str, output_dir: str | Path, config_files: list[str | Path] = (),
              overrides: dict[str, Any] | None = None, data_dir: str | Path | None = None, overwrite: bool = False,
              resume: bool = False, world_size: int = 1, tracking: str = "auto",
              tracking_uri: str | None = None) -> None:
    """Every check ``train`` makes before it starts, without writing anything but the dataset
    cache: lets ``--nproc`` report bad input as one clear error before it launches processes."""
    check_environment()
    get_class(model)
    check_tracking(tracking, tracking_uri)
    dataset = _resolve_dataset(dataset)
    config = build_config(model, config_files, overrides, extra={"dataset": str(dataset)})
    name = config.train.device
    device = distributed.device_for(name, 0) if world_size > 1 else resolve_device(name)
    out = directory.resolve_output_dir(output_dir, overwrite=overwrite)
    _, _, payload = directory.open_stage(out, overwrite=overwrite, resume=resume, dry=True)
    data = load_run_data(config, data_dir)
    check_memory(config, data, device, world_size)
    if payload:
        state = checkpoint.decode_training_state(payload)
        checkpoint.check_resumable(state, config.to_dict(), data.fingerprint, world_size,
                                   str(directory.staging_dir(out) / "config.yaml"), data=data)


def deadline_for(time_budget_s: float | None) -> float | None:
    """The ``time.monotonic()`` at which a ``--time-budget`` of ``time_budget_s`` seconds runs out
    (None: no budget); anything but a positive number of seconds is refused."""
    if time_budget_s is None:
        return None
    if isinstance(time_budget_s, bool) or not isinstance(time_budget_s, (int, float)) or not time_budget_s > 0:
        raise MLSA4RecError(f"the time budget must be a positive number of seconds, got {time_budget_s!r}")
    return time.monotonic() + time_budget_s


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
    on_epoch: Callable[[dict[str, Any]], str | None] | None = None,
    time_budget_s: float | None = None,
    tracking: str = "auto",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``dataset``, evaluate the best epoch on valid and test, save the run.

    Under torchrun every rank calls this; rank 0 alone writes files. ``resume`` continues the
    interrupted run of ``output_dir`` from its checkpoint. ``on_step(epoch, step)`` is called
    after every optimiser step (progress reporting, tests), ``on_epoch(row)`` with each epoch's
    history row on rank 0 (a reason it returns pauses the run there, in one process).
    ``time_budget_s``: after that many seconds (from this call), training checkpoints and raises
    ``TimeBudgetSpent``; ``resume`` then continues. ``results["run_dir"]`` is where the run was saved
    (``output_dir`` resolved; see ``directory.publish`` for the one exception).
    ``tracking`` (``--tracking``: auto, tensorboard, mlflow, none) and ``tracking_uri`` (an
    MLflow store) say where each epoch's scalars also go while it trains (``training.tracking``).
    """
    deadline = deadline_for(time_budget_s)
    check_environment()
    get_class(model)  # unknown model: fail before anything else
    check_tracking(tracking, tracking_uri)  # a package missing: before any work
    dataset = _resolve_dataset(dataset)
    config = build_config(model, config_files, overrides, extra={"dataset": str(dataset)})
    group, device = distributed.init(config.train.device, config.train.dist_timeout)
    old_level = log.level
    if not group.is_main:
        log.setLevel(logging.WARNING)  # the other ranks only warn; rank 0 tells the story
    elif log.getEffectiveLevel() > logging.INFO:  # library use without logging set up: still fill train.log
        log.setLevel(logging.INFO)
    try:
        results = _train(model, output_dir, config, data_dir, overwrite=overwrite, resume=resume, on_step=on_step,
                         on_epoch=on_epoch, deadline=deadline, group=group, device=device,
                         tracking=tracking, tracking_uri=tracking_uri)
        # every rank leaves together (rank 0 may still be publishing): a rank that tears gloo down
        # while its peer is busy was seen to abort at exit ("terminate called ...") on a loaded machine
        group.barrier()
        return results
    finally:
        log.setLevel(old_level)
        distributed.destroy(group)


def _train(model: str, output_dir: str | Path, config: Config, data_dir: str | Path | None, *, overwrite: bool,
           resume: bool, on_step: Callable[[int, int], None] | None,
           on_epoch: Callable[[dict[str, Any]], str | None] | None, deadline: float | None, group: DistContext,
           device: torch.device, tracking: str = "auto", tracking_uri: str | None = None) -> dict[str, Any]:
    """Check, train, evaluate, publish. Rank 0 holds the ``directory.Stage`` and the trackers
    (None on the others); the trackers are closed before the stage is published, kept or removed,
    so that the manifest lists finished event files."""
    stage, payload = _open_stage(output_dir, group, overwrite=overwrite, resume=resume)
    training = False  # past the resume checks: a failure from here on keeps the checkpoint with a hint
    trackers: Trackers | None = None

    def epoch_done(row: dict[str, Any]) -> str | None:
        if trackers is not None:
            trackers.log_epoch(row)
        return on_epoch(row) if on_epoch is not None else None

    def close_trackers(status: str) -> None:
        nonlocal trackers
        if trackers is not None:
            trackers.close(status)
            trackers = None

    try:
        data, data_seconds, state = _prepare(config, data_dir, payload if resume else None, stage, group, device)
        data_sha256 = data.file_sha256  # what `evaluate` checks against
        net = build_run_model(config, data.n_items)

        def save_best(m: torch.nn.Module, epoch: int) -> None:
            stage.save_weights(safetensors.torch.save(
                {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()},
                metadata={"model": model, "epoch": str(epoch)}))

        # given on every rank (gathering the ranks' random states is collective); called on rank 0
        trainer = Trainer(net, data, config, device, on_improve=save_best, group=group,
                          on_checkpoint=lambda training_state: stage.save_checkpoint(training_state),
                          on_step=on_step, on_epoch=epoch_done, deadline=deadline)
        if state is not None:
            checkpoint.load_training_state(trainer, state)
            del state, payload

        def start_tracking() -> bytes:  # a tracker that cannot start stops every rank before training
            nonlocal trackers
            p = trainer.progress
            trackers = start_trackers(
                tracking, tracking_uri, stage=stage.path, history=p.history, best_epoch=p.best_epoch,
                resume=resume, experiment=data.name, run_name=stage.out.name, params=config.to_dict(),
                tags={"mlsa4rec.model": model, "mlsa4rec.run_dir": str(stage.out)})
            return b""

        group.run_on_main(start_tracking)
        training = True
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        commit = git_commit()  # the code that trains, not whatever HEAD is when the run ends
        p = trainer.progress  # each session of a paused and resumed run names its own code
        trainer.segments.append({"git_commit": commit, "from_epoch": p.epoch, "from_step": p.step, "started": started})
        fit = trainer.fit()
        results = {
            "model": model, **_data_record(data, data_dir, data_seconds, data_sha256), "train_scheme": trainer.scheme,
            "valid": trainer.evaluate("valid"), "test": trainer.evaluate("test"),
            **_fit_record(fit, net, device, group), "resumed": bool(resume), "started": started,
            "versions": versions(), "git_commit": commit, "segments": list(trainer.segments),
            "history": fit.history,
        }
        if trackers is not None:
            trackers.log_final(results)
        close_trackers("FINISHED")
        _log_final(results)
        if stage is not None:
            # no file of the finished run: left behind when the MLflow tracker was dropped, or by an
            # interrupted command of a run resumed with another --tracking (a failed or paused run keeps
            # it, so that --resume continues its MLflow run)
            (stage.path / MLFLOW_RUN_FILE).unlink(missing_ok=True)
            stage.write_results(results)
    except BaseException as exc:
        close_trackers(status_for(exc))  # before the stage is kept or removed
        exc = as_user_error(exc)
        if stage is not None and stage.fail():
            if isinstance(exc, RunStopped):  # a hook ended it for good (a pruned trial): nothing to resume
                directory.discard_stage(stage.path)
            elif training:
                _add_resume_hint(exc, stage.path)
        raise exc from None
    finally:
        close_trackers("FAILED")  # a safety net: every path above has closed them already
        if stage is not None:
            stage.close_log()
    if stage is None:
        return results
    results["run_dir"] = str(stage.publish())
    return results


def _log_final(results: dict[str, Any]) -> None:
    """The last lines of train.log: the best epoch's metrics on valid, then on test."""
    for split in ("valid", "test"):
        shown = "  ".join(f"{k} {v:.4f}" for k, v in results[split].items())
        log.info("best epoch %d | %s %s", results["best_epoch"], split, shown)


def _open_stage(output_dir: str | Path, group: DistContext, *, overwrite: bool,
                resume: bool) -> tuple[directory.Stage | None, bytes]:
    """Rank 0 opens (or, resuming, reopens) the staging directory; every rank gets the checkpoint bytes."""
    stage: directory.Stage | None = None

    def open_stage() -> bytes:
        nonlocal stage
        stage, payload = directory.Stage.open(output_dir, overwrite=overwrite, resume=resume)
        return payload

    payload = group.run_on_main(open_stage)  # a refusal on rank 0 fails every rank
    return stage, payload


def _prepare(config: Config, data_dir: str | Path | None, payload: bytes | None, stage: directory.Stage | None,
             group: DistContext, device: torch.device) -> tuple[SequenceData, float, dict[str, Any] | None]:
    """Everything that may refuse the run before training starts: the data, the resume checks (when
    ``payload`` holds a checkpoint), the memory estimate. Then the stage's log and setup files.
    Returns the data, the seconds it took to load and the training state to resume from."""
    t0 = time.perf_counter()
    data = load_run_data(config, data_dir)
    data_seconds = time.perf_counter() - t0
    state = checkpoint.decode_training_state(payload) if payload is not None else None
    changed = []
    if state is not None:
        where = str(stage.path / "config.yaml") if stage is not None else "the interrupted run's config.yaml"
        changed = checkpoint.check_resumable(state, config.to_dict(), data.fingerprint, group.world_size, where,
                                             data=data)
    check_memory(config, data, device, group.world_size)
    if stage is not None:
        stage.begin()
    stats = data.stats()
    log.info("dataset %s: %d users, %d items, %d interactions (%.2f s)", stats["dataset"], stats["users"],
             stats["items"], stats["interactions"], data_seconds)
    if state is not None:
        log.info("resuming the interrupted run in %s%s", stage.path if stage is not None else "its stage",
                 f" with changed settings: {'; '.join(changed)}" if changed else "")
    if stage is not None:
        stage.write_setup(config.to_dict(), ItemMap.from_data(data).to_json())
    return data, data_seconds, state


def _data_record(data: SequenceData, data_dir: str | Path | None, data_seconds: float,
                 data_sha256: str) -> dict[str, Any]:
    """What results.json says about the data: its statistics, the data file's SHA-256, the
    fingerprint of file and processing together, the file and the directory."""
    return {"dataset": data.stats(), "data_sha256": data_sha256, "data_fingerprint": data.fingerprint,
            "data_dir": str(Path(d).resolve()) if (d := data_dir_from(data_dir)) else None,
            "data_source": data.source, "data_seconds": round(data_seconds, 3)}


def _fit_record(fit: FitResult, net: torch.nn.Module, device: torch.device, group: DistContext) -> dict[str, Any]:
    """What results.json says about the training: epochs, timings, model size, where it ran."""
    return {"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run, "stopped_early": fit.stopped_early,
            "seconds_per_epoch": round(fit.seconds_per_epoch, 3), "train_seconds": round(fit.train_seconds, 3),
            "eval_seconds": round(fit.eval_seconds, 3), "parameters": net.num_parameters(),
            "parameters_non_embedding": net.num_parameters(exclude_embeddings=True), "device": str(device),
            "threads": torch.get_num_threads(), "world_size": group.world_size}


def _add_resume_hint(exc: BaseException, stage: Path) -> None:
    """A run that failed while training kept its checkpoint: say how to go on (the resume checks
    failing leaves the interrupted run as it was, with no hint)."""
    if isinstance(exc, TimeBudgetSpent):
        exc.args = (f"{exc}; the checkpoint is kept in {str(stage)!r}: run the same command with --resume to "
                    "continue",)
        return
    if isinstance(exc, NonFiniteLoss):
        hint = (f"the last good checkpoint is kept in {str(stage)!r}; resuming unchanged would diverge again: rerun "
                "with --resume --set clip_grad_norm=1.0 to continue with gradient clipping, or with --overwrite "
                "and a lower learning_rate (--set learning_rate=...) to start over")
    else:
        hint = (f"the last checkpoint is kept in {str(stage)!r}: rerun the same command with --resume to continue "
                "from it, or with --overwrite to start over")
    if isinstance(exc, MLSA4RecError):
        exc.args = (f"{exc}; {hint}",)
    else:
        log.warning("%s", hint)
