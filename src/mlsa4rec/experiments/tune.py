"""Tuning one model's recipe on one dataset: Optuna's TPE over a search-space file, the validation
metric as objective, unpromising trials pruned from their per-epoch validation curve.

Each trial is an ordinary run directory (``DIR/trials/trial-N``). The storage rules are a study's
(an SQLite file in the tuning directory, or a URL several machines share; heartbeats hand a dead
worker's trial to another, which continues it from its checkpoint), and so is ``--time-budget``.
The best settings are written as a preset file that ``--config`` takes, with the history and
importance figures beside it.

A search space file maps settings to distributions::

    learning_rate: {type: log, low: 1.0e-4, high: 1.0e-2}     # log-uniform float
    hidden_dropout_prob: {type: float, low: 0.1, high: 0.5}    # uniform float
    n_layers: {type: int, low: 1, high: 3}                     # integer, both ends included
    hidden_size: {type: choice, values: [32, 64, 128]}         # one of the values
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import yaml

from mlsa4rec.config import build_config, known_keys, load_yaml_file
from mlsa4rec.errors import ConfigError, MLSA4RecError, RunStopped, TimeBudgetSpent
from mlsa4rec.experiments.study import HEARTBEAT_S, storage_for
from mlsa4rec.fileio import atomic_path, write_text_atomic
from mlsa4rec.runs import directory
from mlsa4rec.settings import check_value, unknown_key

log = logging.getLogger("mlsa4rec")

TYPES = ("log", "float", "int", "choice")
PRUNERS = ("median", "hyperband", "none")


def load_space(path: str | Path, model: str) -> dict[str, dict[str, Any]]:
    """A search space file, every key a setting of ``model`` and every range non-empty."""
    raw = load_yaml_file(path)
    if not raw:
        raise ConfigError(f"search space {str(path)!r} is empty; name at least one setting to tune")
    known = known_keys(model)
    space = {}
    for key, spec in raw.items():
        where = f"search space {str(path)!r}: {key}"
        if key not in known:
            raise unknown_key(key, known, model)
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise ConfigError(f"{where} must be {{type: {' | '.join(TYPES)}, ...}}, got {spec!r}")
        if spec["type"] == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: a choice needs a non-empty list of values")
            space[key] = {"type": "choice", "values": [check_value(key, v, known[key]) for v in values]}
            continue
        low, high = spec.get("low"), spec.get("high")
        want = int if spec["type"] == "int" else float
        low, high = (check_value(key, v, want(0)) for v in (low, high))
        if not low < high or (spec["type"] == "log" and low <= 0):
            raise ConfigError(f"{where}: the range [{low}, {high}] is empty" + (" or not positive (log)"
                                                                               if spec["type"] == "log" else ""))
        space[key] = {"type": spec["type"], "low": low, "high": high}
    return space


def _suggest(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, spec in space.items():
        if spec["type"] == "choice":
            out[key] = trial.suggest_categorical(key, spec["values"])
        elif spec["type"] == "int":
            out[key] = trial.suggest_int(key, spec["low"], spec["high"])
        else:
            out[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec["type"] == "log")
    return out


def _pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def tune(model: str, dataset: str, space_file: str | Path, trials: int, out_dir: str | Path, *,
         config_files: list[str] = (), overrides: dict[str, Any] | None = None, data_dir: str | None = None,
         storage: str | None = None, pruner: str = "median", seed: int = 0, time_budget_s: float | None = None,
         heartbeat_s: int = HEARTBEAT_S) -> dict[str, Any] | None:
    """Run trials until ``trials`` have finished (complete or pruned) in the tuning directory's study;
    returns the best trial's settings and value, or None when ``time_budget_s`` paused it."""
    import optuna

    from mlsa4rec.training.run import train

    if not isinstance(trials, int) or trials < 1:
        raise MLSA4RecError(f"--trials must be at least 1, got {trials!r}")
    if pruner not in PRUNERS:
        raise MLSA4RecError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise MLSA4RecError(f"the time budget must be a positive number of seconds, got {time_budget_s!r}")
    space = load_space(space_file, model)
    fixed = dict(overrides or {})
    base = build_config(model, list(config_files), fixed, extra={"dataset": dataset})  # refusals before any trial
    for key, spec in space.items():  # every corner of the space must be a config the model accepts
        for value in (spec["values"] if spec["type"] == "choice" else (spec["low"], spec["high"])):
            build_config(model, list(config_files), {**fixed, key: value}, extra={"dataset": dataset})
    metric = base.train.valid_metric
    root = Path(out_dir)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(root / 'tune.db').resolve()}"
    try:
        opt = optuna.create_study(study_name=f"tune-{model}", storage=storage_for(url, heartbeat_s),
                                  load_if_exists=True, direction="maximize",
                                  sampler=optuna.samplers.TPESampler(seed=seed), pruner=_pruner(pruner))
    except MLSA4RecError:
        if created:
            root.rmdir()
        raise
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    paused = False

    def objective(trial) -> float:
        nonlocal paused
        settings = {**fixed, **_suggest(trial, space)}
        # named by its settings: a trial queued again (its worker died, or it paused) finds its
        # checkpoint, and settings TPE draws twice are trained once
        out = root / "trials" / ("trial-" + hashlib.sha256(json.dumps(trial.params, sort_keys=True).encode())
                                 .hexdigest()[:12])
        if (out / directory.MANIFEST).is_file():
            directory.verify_run(out)
            return float(json.loads((out / "results.json").read_text(encoding="utf-8"))["valid"][metric])
        resume = (directory.staging_dir(out) / "checkpoint.pt").is_file()

        def report(row: dict[str, Any]) -> None:
            if "valid" in row:
                trial.report(row["valid"][metric], row["epoch"])
                if trial.should_prune():
                    raise RunStopped(f"pruned at epoch {row['epoch']}")

        remaining = None if deadline is None else max(deadline - time.monotonic(), 1e-9)
        try:
            results = train(model, dataset, out, list(config_files), settings, data_dir, resume=resume,
                            on_epoch=report, time_budget_s=remaining)
        except RunStopped as exc:  # training removed the stage: nothing to continue
            raise optuna.TrialPruned(str(exc)) from None
        except directory.StageBusy:
            raise optuna.TrialPruned("another worker trains these settings") from None
        except TimeBudgetSpent:
            paused = True
            opt.enqueue_trial(trial.params)
            trial.set_user_attr("paused", True)
            opt.stop()
            raise optuna.TrialPruned("paused") from None
        return float(results["valid"][metric])

    def finished() -> int:
        return sum(t.state.name in ("COMPLETE", "PRUNED") and not t.user_attrs.get("paused")
                   for t in opt.get_trials(deepcopy=False))

    while not paused and finished() < trials:
        opt.optimize(objective, n_trials=1, catch=(MLSA4RecError,))
    if paused:
        return None
    best = opt.best_trial
    preset = {"model": model, **fixed, **best.params}
    header = (f"# best of {finished()} trials of `mlsa4rec tune` ({metric} {best.value:.4f} on valid, trial "
              f"{best.number}); pass it with --config\n")
    write_text_atomic(root / "best.yaml", header + yaml.safe_dump(preset, sort_keys=False))
    _figures(opt, root)
    return {"params": best.params, "value": best.value, "trial": best.number, "preset": str(root / "best.yaml")}


def _figures(opt, root: Path) -> None:
    """The optimisation history and the settings' importance (fANOVA), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    done = [t for t in opt.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    figures = {"history": vis.plot_optimization_history}
    if len(done) >= 2 and len(done[0].params) >= 1 and math.isfinite(opt.best_value):
        figures["importance"] = vis.plot_param_importances
    for name, plot in figures.items():
        try:
            ax = plot(opt)
        except (ValueError, RuntimeError) as exc:  # e.g. every completed trial with the same value
            log.warning("no %s figure: %s", name, exc)
            continue
        ax.figure.tight_layout()
        with atomic_path(root / f"{name}.png") as tmp:
            ax.figure.savefig(tmp, dpi=120, format="png")
        plt.close(ax.figure)
