"""Tracking a run while it trains: each epoch's scalars in TensorBoard and, on request, MLflow.

The trainer only hands each epoch's history row to ``on_epoch`` (rank 0); this module turns the
rows into scalars for the trackers ``--tracking`` chooses:

* ``auto`` (the default): TensorBoard when the ``tensorboard`` package is installed, else nothing;
* ``tensorboard``: TensorBoard, refused before training when the package is missing;
* ``mlflow``: an MLflow tracking store (``--tracking-uri``, else MLflow's own default), plus
  TensorBoard when installed;
* ``none``: nothing.

TensorBoard's event files go to the run's ``tensorboard/`` (listed in its manifest; see
``runs.directory``), written by the packages' own writers. Tracking never costs a run: a tracker
that fails while the run trains is dropped with one warning and training goes on. A resumed run
continues the same curves: TensorBoard purges the steps it logs again, and the MLflow run whose id
the stage keeps in ``mlflow-run.json`` is continued (or a new one started, with a warning).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from mlsa4rec.errors import MLSA4RecError, TimeBudgetSpent
from mlsa4rec.fileio import write_json_atomic
from mlsa4rec.runs.directory import TENSORBOARD

log = logging.getLogger("mlsa4rec")

CHOICES = ("auto", "tensorboard", "mlflow", "none")
# in the stage while a run with MLflow trains, so that --resume continues the same MLflow run; it is no
# file of the finished run: closing the MLflow tracker of a finished run removes it, and training.run
# removes it before publishing whatever tracked the run's last command (--tracking none on --resume, or
# an MLflow tracker dropped after a failure, never closes it); a failed or paused run keeps it
MLFLOW_RUN_FILE = "mlflow-run.json"


class Tracker(Protocol):
    """Where a run's scalars go while it trains (rank 0 only)."""

    name: str

    def log_epoch(self, row: dict[str, Any]) -> None: ...

    def log_final(self, results: dict[str, Any]) -> None: ...

    def close(self, status: str) -> None: ...  # "FINISHED", "FAILED" or "KILLED" (paused or interrupted)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _missing(package: str, choice: str) -> MLSA4RecError:
    return MLSA4RecError(f"--tracking {choice} needs the {package} package, which is not installed: pip install "
                         f"'mlsa4rec[{package}]' (or pass --tracking auto or none)")


def check_tracking(tracking: str, tracking_uri: str | None = None) -> tuple[bool, bool]:
    """Which trackers a run of ``--tracking tracking`` starts: (TensorBoard, MLflow). An unusable
    choice is refused here, before any training (so that a missing package never costs a run)."""
    if tracking not in CHOICES:
        raise MLSA4RecError(f"--tracking must be one of {', '.join(CHOICES)}, got {tracking!r}")
    if tracking_uri is not None and tracking != "mlflow":
        raise MLSA4RecError("--tracking-uri names an MLflow tracking store; pass it with --tracking mlflow")
    if tracking == "mlflow" and not _installed("mlflow"):
        raise _missing("mlflow", tracking)
    tensorboard = _installed("tensorboard")
    if tracking == "tensorboard" and not tensorboard:
        raise _missing("tensorboard", tracking)
    return tensorboard and tracking != "none", tracking == "mlflow"


def status_for(exc: BaseException) -> str:
    """The MLflow status of a run stopped by ``exc``: a pause or Ctrl-C is not a failure."""
    return "KILLED" if isinstance(exc, (TimeBudgetSpent, KeyboardInterrupt)) else "FAILED"


def epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of one history row by tag: ``train/loss``, ``train/lr``, ``valid/METRIC@K``,
    ``time/train_seconds``, ``time/eval_seconds``, ``memory/peak_bytes`` (where the row has them)."""
    scalars = {"train/loss": row["loss"], "train/lr": row["lr"], "time/train_seconds": row["train_seconds"]}
    if "eval_seconds" in row:
        scalars["time/eval_seconds"] = row["eval_seconds"]
    if row.get("peak_memory_bytes") is not None:
        scalars["memory/peak_bytes"] = row["peak_memory_bytes"]
    scalars.update({f"valid/{k}": v for k, v in (row.get("valid") or {}).items()})
    return {tag: float(value) for tag, value in scalars.items()}


def final_scalars(results: dict[str, Any]) -> dict[str, float]:
    """The best epoch's metrics at the end of a run: ``best_valid/METRIC@K`` and ``test/METRIC@K``."""
    return {f"{name}/{k}": float(v) for name, split in (("best_valid", "valid"), ("test", "test"))
            for k, v in results[split].items()}


# --- TensorBoard -----------------------------------------------------------------------------------

class TensorBoardTracker:
    """Event files in ``folder`` (the stage's ``tensorboard/``), one scalar per tag and epoch.

    A resumed run writes a new event file beside the old ones; it starts with TensorBoard's purge
    marker at the first epoch it logs again (the checkpoint's last), so the curve stays one line
    even where the interrupted command had logged an epoch the checkpoint does not hold.
    """

    name = "TensorBoard"

    def __init__(self, folder: Path, history: list[dict[str, Any]], best_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        earlier = folder.is_dir() and any(folder.iterdir())
        replay = history
        purge = None
        if earlier and history:  # the last epoch, and the best one (its test scalars), may be logged again
            purge = min(history[-1]["epoch"], best_epoch) if best_epoch >= 1 else history[-1]["epoch"]
            replay = [row for row in history if row["epoch"] >= purge]
        folder.mkdir(exist_ok=True)
        self.writer = SummaryWriter(str(folder), purge_step=purge)
        for row in replay:
            self.log_epoch(row)

    def log_epoch(self, row: dict[str, Any]) -> None:
        for tag, value in epoch_scalars(row).items():
            self.writer.add_scalar(tag, value, row["epoch"])
        self.writer.flush()  # readable while the run trains

    def log_final(self, results: dict[str, Any]) -> None:
        for tag, value in final_scalars(results).items():
            self.writer.add_scalar(tag, value, results["best_epoch"])

    def close(self, status: str) -> None:
        self.writer.close()


# --- MLflow --------------------------------------------------------------------------------------

def mlflow_key(tag: str) -> str:
    """A tag as an MLflow name, which allows letters, digits, ``_ - . : /`` and spaces only:
    ``valid/hit@10`` becomes ``valid/hit_at_10``."""
    return re.sub(r"[^\w.\- :/]", "_", tag.replace("@", "_at_"))


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    return (items[i:i + size] for i in range(0, len(items), size))


class MLflowTracker:
    """One MLflow run per run directory: experiment = the dataset, run name = the output
    directory's name, params = every setting by key; per-epoch metrics at step = epoch, the best
    epoch's valid and test metrics at the end. The run's id is kept in the stage so that
    ``--resume`` continues it."""

    name = "MLflow"

    def __init__(self, uri: str | None, *, experiment: str, run_name: str, params: dict[str, Any],
                 tags: dict[str, str], stage: Path, history: list[dict[str, Any]], resume: bool) -> None:
        try:
            import mlflow
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise MLSA4RecError(f"--tracking mlflow cannot import mlflow ({exc}); pip install 'mlsa4rec[mlflow]'"
                                ) from None
        self._metric, self._param = Metric, Param
        self.uri = uri or mlflow.get_tracking_uri()
        self.saved = stage / MLFLOW_RUN_FILE
        try:
            self.client = MlflowClient(self.uri)
            logged = self._open(experiment, run_name, params, tags, resume, len(history))
        except MLSA4RecError:
            raise
        except Exception as exc:  # noqa: BLE001 - a store MLflow refuses or cannot reach: one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MLSA4RecError(f"cannot use the MLflow tracking store {self.uri!r}: {first}") from None
        write_json_atomic(self.saved, {"run_id": self.run_id, "tracking_uri": self.uri})
        for row in history:  # a new run gets the epochs so far; a continued one those it lacks
            if row["epoch"] not in logged:
                self.log_epoch(row)

    def _open(self, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str], resume: bool,
              epochs: int) -> set[int]:
        """Continue the interrupted run's MLflow run, or create one; returns the epochs it has."""
        saved = self._read_saved() if resume else None
        if saved is not None:
            run = self._find(saved)
            if run is not None:
                self.run_id = run.info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                new = {k: v for k, v in params.items() if mlflow_key(k) not in run.data.params}
                self._log_params(new)
                log.info("continuing MLflow run %s in %s", self.run_id, self.uri)
                return {m.step for m in self.client.get_metric_history(self.run_id, "train/loss")}
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        self._log_params(params)
        if saved is not None:
            log.warning("the MLflow run %s of the interrupted run was not found in %s; started a new one, %s, with "
                        "the %d epochs so far", saved.get("run_id"), self.uri, self.run_id, epochs)
        elif resume:
            log.info("the interrupted run had no MLflow run; started one, %s, with the %d epochs so far",
                     self.run_id, epochs)
        log.info("MLflow run %s (experiment %r) in %s", self.run_id, experiment, self.uri)
        return set()

    def _read_saved(self) -> dict[str, Any] | None:
        try:
            saved = json.loads(self.saved.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return saved if isinstance(saved, dict) else None

    def _find(self, saved: dict[str, Any]) -> Any:
        """The saved MLflow run, if it is in this store and not deleted (None otherwise)."""
        if saved.get("tracking_uri") != self.uri or not isinstance(saved.get("run_id"), str):
            return None
        try:
            run = self.client.get_run(saved["run_id"])
        except Exception:  # noqa: BLE001 - gone, or never in this store: a new run, and the warning says so
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def _log_params(self, params: dict[str, Any]) -> None:
        rows = [self._param(mlflow_key(k), (v if isinstance(v, str) else json.dumps(v))[:6000])
                for k, v in params.items()]
        for chunk in _chunks(rows, 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=chunk)

    def _log(self, scalars: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(mlflow_key(tag), value, now, step) for tag, value in scalars.items()]
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._log(epoch_scalars(row), row["epoch"])

    def log_final(self, results: dict[str, Any]) -> None:
        self._log({**final_scalars(results), "best_epoch": float(results["best_epoch"])}, results["best_epoch"])

    def close(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status)
        finally:
            if status == "FINISHED":  # the finished run directory holds no such file
                self.saved.unlink(missing_ok=True)


# --- all of them ---------------------------------------------------------------------------------

class Trackers:
    """The trackers of one run, as one: a tracker that fails is dropped with a warning (tracking
    never stops a run), and closing closes every one."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = list(trackers)

    def _each(self, what: str, call: Any) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - tracking must never cost the run
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                log.warning("%s tracking stopped: %s failed (%s); the run goes on without it", tracker.name, what,
                            first)
                self.trackers.remove(tracker)

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._each(f"logging epoch {row['epoch']}", lambda t: t.log_epoch(row))

    def log_final(self, results: dict[str, Any]) -> None:
        self._each("logging the final metrics", lambda t: t.log_final(results))

    def close(self, status: str) -> None:
        self._each("closing", lambda t: t.close(status))
        self.trackers = []


def start_trackers(tracking: str, tracking_uri: str | None, *, stage: Path, history: list[dict[str, Any]],
                   best_epoch: int, resume: bool, experiment: str, run_name: str, params: dict[str, Any],
                   tags: dict[str, str]) -> Trackers:
    """Open the trackers ``tracking`` asks for (see ``check_tracking``), before training starts:
    one that cannot start is an error when it was asked for by name, a warning under ``auto``.
    ``history`` (the epochs a resumed run already has) is logged where a tracker lacks it."""
    tensorboard, mlflow = check_tracking(tracking, tracking_uri)
    trackers: list[Tracker] = []
    try:
        if tensorboard:
            try:
                trackers.append(TensorBoardTracker(stage / TENSORBOARD, history, best_epoch))
            except Exception as exc:  # noqa: BLE001 - a broken install, a full disk
                if tracking == "tensorboard":
                    raise MLSA4RecError(f"cannot start TensorBoard tracking: {exc}") from None
                log.warning("TensorBoard tracking is off: %s", exc)
        if mlflow:
            trackers.append(MLflowTracker(tracking_uri, experiment=experiment, run_name=run_name, params=params,
                                          tags=tags, stage=stage, history=history, resume=resume))
    except BaseException:
        Trackers(trackers).close("FAILED")
        raise
    return Trackers(trackers)
