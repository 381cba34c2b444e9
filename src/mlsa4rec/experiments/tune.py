"""Tuning one model's recipe on one dataset: Optuna's TPE over a search-space file, the validation
metric as objective, unpromising trials pruned from their per-epoch validation curve.

Each trial is an ordinary run directory, ``DIR/trials/trial-HASH``: the hash of the tuning's inputs
(the model, the dataset, the config files' settings and the fixed ``--set`` settings) and of the
trial's own settings, so that a trial queued again finds its checkpoint, settings drawn twice are
trained once, and a tuning with other inputs in the same directory never takes another's trials.
The Optuna study is named by the model and a hash of those inputs and the search space
(``tune-MODEL-HASH``), and ``DIR/tune.json`` records them. The storage rules are a study's (an
SQLite file in the tuning directory, or a URL several machines share; heartbeats hand a dead
worker's trial to another, which continues it from its checkpoint), and so is ``--time-budget``.
The best settings are written as a preset file that ``--config`` takes, after the config files the
trials used, with the history and importance figures beside it; ``DIR/trials.md`` and
``DIR/trials.json`` list every trained setting, its outcome and the compute spent (rewritten after
every call, so a paused tuning's progress can be committed).

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
import os
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from mlsa4rec.config import build_config, known_keys, load_yaml_file
from mlsa4rec.data import REGISTRY
from mlsa4rec.errors import ConfigError, MLSA4RecError, RunStopped, TimeBudgetSpent
from mlsa4rec.experiments import workers
from mlsa4rec.experiments.study import HEARTBEAT_S, storage_for
from mlsa4rec.fileio import atomic_path, write_json_atomic, write_text_atomic
from mlsa4rec.runs import directory
from mlsa4rec.settings import check_value, unknown_key

log = logging.getLogger("mlsa4rec")

TYPES = ("log", "float", "int", "choice")
PRUNERS = ("median", "hyperband", "none")
SEED_LIMIT = 2 ** 32
FAILURES_IN_A_ROW = 3  # failed trials in a row that end a tuning: the space holds settings the model refuses
BUSY_WAIT_S = 1.0  # after drawing settings another worker trains, before drawing again


def load_space(path: str | Path, model: str) -> dict[str, dict[str, Any]]:
    """A search space file, every key a setting of ``model`` and every range non-empty."""
    raw = load_yaml_file(path, "search space", "--space")
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


def _seed_problem(seed: Any) -> str | None:
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT):
        return None
    return f"--seed must be an integer from 0 to {SEED_LIMIT - 1}, or left out for a random search, got {seed!r}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tuning_inputs(model: str, dataset: str, config_files: list[str | Path], fixed: dict[str, Any]) -> dict[str, Any]:
    """What every trial of a tuning shares: the model, the dataset (a file's resolved path), the
    config files (as given and resolved, with their settings) and the fixed ``--set`` settings.
    A trial's directory hashes these (less the files' names) with its own settings."""
    if dataset not in REGISTRY and Path(dataset).is_file():
        dataset = str(Path(dataset).resolve())
    files = [{"file": str(Path(f).resolve()) if Path(f).is_file() else str(f), "settings": load_yaml_file(f)}
             for f in config_files]
    return {"model": model, "dataset": dataset, "config": files, "set": dict(fixed)}


def _trial_key(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs that decide a trial's run: the config files by their settings, not by their names."""
    return {**inputs, "config": [f["settings"] for f in inputs["config"]]}


def _created_dirs(root: Path) -> Path | None:
    """The outermost folder that ``root.mkdir(parents=True)`` would create (None: it exists)."""
    top = None
    for folder in (root, *root.parents):
        if os.path.lexists(folder):
            break
        top = folder
    return top


def _remove_created(root: Path, top: Path | None, default_storage: bool) -> None:
    """Undo the creation of the tuning directory (and the folders above it that this call made)."""
    if top is None:
        return
    if default_storage:
        for name in ("tune.db", "tune.db-journal", "tune.db-wal", "tune.db-shm"):
            (root / name).unlink(missing_ok=True)
    for folder in (root, *root.parents):
        try:
            folder.rmdir()
        except OSError:  # someone else's file in it: kept
            return
        if folder == top:
            return


def _shown(path: str | Path) -> str:
    """A path as the preset's header shows it: relative to the working directory when inside it (a
    preset committed with its tuning must not name one machine's folders), else absolute."""
    relative = os.path.relpath(Path(path).resolve())
    return str(Path(path).resolve()) if relative.startswith("..") else relative


def _shown_configs(inputs: dict[str, Any]) -> str:
    return " ".join(f"--config {shlex.quote(_shown(f['file']))}" for f in inputs["config"])


def tune(model: str, dataset: str, space_file: str | Path, trials: int, out_dir: str | Path, *,
         config_files: list[str] = (), overrides: dict[str, Any] | None = None, data_dir: str | None = None,
         storage: str | None = None, pruner: str = "median", seed: int | None = None,
         time_budget_s: float | None = None, heartbeat_s: int = HEARTBEAT_S) -> dict[str, Any] | None:
    """Run trials until ``trials`` have finished (complete or pruned) in the tuning's study; returns
    the best trial's settings and value, or None when ``time_budget_s`` paused it.

    ``seed`` seeds this worker's sampler (its search is then reproducible); None, the default, is
    Optuna's random seed, so that several workers of one tuning draw different settings. Trials
    skipped because another worker trains the same settings do not count; ``FAILURES_IN_A_ROW``
    failed trials in a row end the tuning with an error (settings the model refuses together)."""
    import optuna
    from optuna.trial import TrialState

    from mlsa4rec.training import stop
    from mlsa4rec.training.run import deadline_for, git_commit, train

    if not isinstance(trials, int) or trials < 1:
        raise MLSA4RecError(f"--trials must be at least 1, got {trials!r}")
    if pruner not in PRUNERS:
        raise MLSA4RecError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    deadline_for(time_budget_s)  # refused before anything is created; the clock starts below
    git_commit()  # the code this worker imported: its trials name it, whatever HEAD becomes meanwhile
    if (problem := _seed_problem(seed)) is not None:
        raise MLSA4RecError(problem)
    space = load_space(space_file, model)
    fixed = dict(overrides or {})
    base = build_config(model, list(config_files), fixed, extra={"dataset": dataset})  # refusals before any trial
    for key, spec in space.items():  # every corner of the space must be a config the model accepts
        for value in (spec["values"] if spec["type"] == "choice" else (spec["low"], spec["high"])):
            build_config(model, list(config_files), {**fixed, key: value}, extra={"dataset": dataset})
    metric = base.train.valid_metric
    inputs = tuning_inputs(model, dataset, list(config_files), fixed)
    key = _trial_key(inputs)
    name = f"tune-{model}-{_digest({**key, 'space': space})[:8]}"
    root = Path(out_dir)
    if os.path.lexists(root) and not root.is_dir():
        raise MLSA4RecError(f"--dir {str(root)!r} exists and is not a directory; name a tuning directory (new, or "
                            "one an earlier tuning made)")
    top = _created_dirs(root)
    root.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(root / 'tune.db').resolve()}"
    try:
        opt = optuna.create_study(study_name=name, storage=storage_for(url, heartbeat_s), load_if_exists=True,
                                  direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                  pruner=_pruner(pruner))
        write_json_atomic(root / "tune.json", {"study": name, **inputs, "space": space})
    except BaseException as exc:
        _remove_created(root, top, storage is None)
        if isinstance(exc, (MLSA4RecError, OSError)) or not isinstance(exc, Exception):
            raise  # one line already (the CLI words an OSError), or Ctrl-C
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MLSA4RecError(f"cannot create the tuning study {name!r} in {url!r}: {first}") from None
    deadline = deadline_for(time_budget_s)
    paused = False
    outcome: dict[str, str] = {}  # what became of this worker's last trial: "error" or "busy"

    def objective(trial) -> float:
        workers.mark(trial)  # should this process die, a worker here hands the trial back at once
        try:
            return run_trial(trial)
        except MLSA4RecError as exc:  # Optuna records the trial as failed (catch=): say why in one line
            outcome["error"] = str(exc)
            log.warning("trial %d (%s) failed: %s", trial.number, trial.params, exc)
            raise

    def run_trial(trial) -> float:
        nonlocal paused
        settings = {**fixed, **_suggest(trial, space)}
        # named by the tuning's inputs and its settings: a trial queued again (its worker died, or it
        # paused) finds its checkpoint, and settings TPE draws twice are trained once
        out = root / "trials" / ("trial-" + _digest({"inputs": key, "params": trial.params})[:12])
        trial.set_user_attr("run", out.name)
        earlier = _finished_before(opt, trial.number, out.name)
        if earlier is not None:  # drawn again (a seeded sampler replays its draws when a tuning resumes)
            trial.set_user_attr("repeat_of", earlier.number)
            repeats.append(trial.number)
            if earlier.state == TrialState.PRUNED:  # its outcome again, without training it again
                raise optuna.TrialPruned(f"settings of trial {earlier.number}, pruned there")
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
        except directory.StageBusy:  # not a finished trial: the other worker's is
            outcome["busy"] = "yes"
            trial.set_user_attr("skipped", "another worker trains these settings")
            raise optuna.TrialPruned("another worker trains these settings") from None
        except TimeBudgetSpent:
            paused = True
            with stop.sigint_deferred():
                opt.enqueue_trial(trial.params)
            trial.set_user_attr("paused", True)
            opt.stop()
            raise optuna.TrialPruned("paused") from None
        except KeyboardInterrupt:  # Ctrl-C: its settings are queued again, to continue from the checkpoint
            with stop.sigint_deferred():  # (a second Ctrl-C meanwhile would lose them)
                opt.enqueue_trial(trial.params)
            raise
        return float(results["valid"][metric])

    def finished() -> int:
        return len(_finished_runs(opt))

    failed: list[str] = []  # this worker's failed trials since its last one that did not fail
    optuna_log = logging.getLogger("optuna.study._optimize")  # a caught failure's traceback: we say it in one line
    level = optuna_log.level
    optuna_log.setLevel(logging.ERROR)
    started = False  # the first trial of a call always starts (a spent budget pauses it at its first checkpoint)
    repeats: list[int] = []  # this call's draws of settings already finished, since its last new one
    try:
        while not paused and finished() < trials:
            if started and (stop.requested() or deadline is not None and time.monotonic() >= deadline):
                paused = True  # no other trial may start once the budget is spent or a pause was asked for
                break
            if len(repeats) > trials:  # a resumed replay is shorter than --trials: the space has run out
                log.warning("%d draws in a row gave settings already tried: the search space holds fewer than %d "
                            "settings; stopping at %d", len(repeats), trials, finished())
                break
            started = True
            outcome.clear()
            drawn = len(repeats)
            workers.fail_dead_workers(opt)  # a trial whose worker died here is queued again before any new one
            try:
                opt.optimize(objective, n_trials=1, catch=(MLSA4RecError,))
            except (ValueError, AssertionError) as exc:  # our trial went stale: another worker failed (and requeued) it
                stale = workers.told_after_takeover(exc)
                if stale is None:
                    raise
                log.warning("a trial's result was not recorded (%s): another worker took it for dead and queued "
                            "it again; going on", stale)
                continue
            if "error" in outcome:
                failed.append(outcome["error"])
                if len(failed) >= FAILURES_IN_A_ROW:
                    raise MLSA4RecError(
                        f"{len(failed)} trials in a row failed, the last with: {failed[-1]}; narrow the search "
                        f"space {str(space_file)!r} to settings the model accepts together (with the --config "
                        "and --set settings), then run the same command again")
            else:
                failed.clear()
                if len(repeats) == drawn:  # a new setting (or one another worker trains): the run of repeats ends
                    repeats.clear()
                if "busy" in outcome:
                    time.sleep(BUSY_WAIT_S)  # let the other worker get on before drawing again
    finally:
        optuna_log.setLevel(level)
    write_summary(opt, root, metric, trials, finished())
    if paused:
        return None
    done = opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise MLSA4RecError(f"no trial completed; the {finished()} finished trials of {str(root)!r} were all pruned: "
                            "raise --trials to run more, or pass --pruner none")
    best = opt.best_trial
    preset = {"model": model, **fixed, **best.params}
    configs = _shown_configs(inputs)
    preset_file = shlex.quote(_shown(root / "best.yaml"))
    use = f"pass it after them: {configs} --config {preset_file}" if configs else f"pass it with --config {preset_file}"
    header = (f"# best of {finished()} trials of `mlsa4rec tune` (study {name}): {metric} {best.value:.4f} on "
              f"valid, trial {best.number} (trials/{best.user_attrs.get('run', '?')})\n"
              f"# the trials used {'the config files ' + configs if configs else 'no config file'}; {use}\n")
    write_text_atomic(root / "best.yaml", header + yaml.safe_dump(preset, sort_keys=False))
    _figures(opt, root)
    return {"params": best.params, "value": best.value, "trial": best.number, "preset": str(root / "best.yaml"),
            "study": name}


def _finished(trial) -> bool:
    """Whether ``trial`` finished its setting (complete or pruned), not paused or skipped."""
    from optuna.trial import TrialState

    return (trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and "run" in trial.user_attrs
            and not trial.user_attrs.get("paused") and not trial.user_attrs.get("skipped"))


def _finished_runs(opt) -> set[str]:
    """The run names of the settings the tuning has finished (complete or pruned): what ``--trials``
    counts. Settings drawn again count once: a seeded sampler replays its first draws each time a
    tuning resumes, and counting those would make the budget depend on how often it was paused."""
    return {t.user_attrs["run"] for t in opt.get_trials(deepcopy=False) if _finished(t)}


def _finished_before(opt, number: int, run: str):
    """The first trial before ``number`` that finished ``run`` (complete or pruned, not paused), or None."""
    return next((t for t in opt.get_trials(deepcopy=False)
                 if t.number < number and t.user_attrs.get("run") == run and _finished(t)), None)


def trial_rows(opt, root: Path) -> list[dict[str, Any]]:
    """One row per trained setting of the tuning, in the order they were first drawn: its state
    (complete, pruned, failed, paused, running), the epochs it reached, its validation metric (the
    final one, or the last reported before it was pruned), the seconds its trials took together (a
    paused setting's time is added up over the calls that continued it) and, for a finished run still
    on this machine, its test metrics. Trials skipped because another worker trained the same
    settings are not rows: their time is the other worker's."""
    rows: dict[str, dict[str, Any]] = {}
    for t in opt.get_trials(deepcopy=False):
        run = t.user_attrs.get("run")
        if run is None or t.user_attrs.get("skipped"):
            continue
        row = rows.setdefault(run, {"trial": t.number, "run": run, "params": dict(t.params), "seconds": 0.0,
                                    "epochs": 0, "value": None, "state": "running"})
        if t.datetime_start is not None and t.datetime_complete is not None:
            row["seconds"] += (t.datetime_complete - t.datetime_start).total_seconds()
        if t.intermediate_values:
            row["epochs"] = max(row["epochs"], max(t.intermediate_values))
            row["value"] = t.intermediate_values[max(t.intermediate_values)]
        state = t.state.name.lower()
        if state == "pruned" and t.user_attrs.get("paused"):
            state = "paused"
        if state != "waiting":
            row["state"] = state
        if state == "complete":
            row["value"] = t.value
    for row in rows.values():
        row["seconds"] = round(row["seconds"], 1)
        results = root / "trials" / row["run"] / "results.json"
        if row["state"] == "complete" and results.is_file():
            done = json.loads(results.read_text(encoding="utf-8"))
            row["epochs"], row["test"] = done["epochs_run"], done["test"]
    return sorted(rows.values(), key=lambda r: r["trial"])


def write_summary(opt, root: Path, metric: str, wanted: int, finished: int) -> None:
    """``DIR/trials.json`` and ``DIR/trials.md``: every trained setting with its outcome, the total
    compute (the budget a comparison of tunings must hold equal) and the best setting, rewritten
    after every call, paused or finished, so that a tuning's progress can be committed and read.
    ``finished`` counts trials as the tuning does: each setting once, as the rows do."""
    inputs = json.loads((root / "tune.json").read_text(encoding="utf-8"))
    rows = trial_rows(opt, root)
    count = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "paused", "running")}
    complete = [r for r in rows if r["state"] == "complete"]
    best = max(complete, key=lambda r: r["value"]) if complete else None
    summary = {"study": opt.study_name, "model": inputs["model"], "dataset": inputs["dataset"],
               "config": [f["file"] for f in inputs["config"]], "set": inputs["set"], "space": inputs["space"],
               "metric": metric, "trials_wanted": wanted, "finished": finished,
               **count, "epochs": sum(r["epochs"] for r in rows),
               "seconds": round(sum(r["seconds"] for r in rows), 1), "best": best, "trials": rows}
    write_json_atomic(root / "trials.json", summary)
    keys = list(inputs["space"])
    shown = [m for m in ("hit@10", "ndcg@10") if best is not None and m in best.get("test", {})]
    lines = [f"# Tuning {inputs['model']} on {Path(inputs['dataset']).name}",
             "",
             f"Study `{opt.study_name}`: {summary['finished']} of {wanted} trials finished ({len(rows)} settings "
             f"trained: {count['complete']} complete, {count['pruned']} pruned, {count['failed']} failed), "
             f"{summary['epochs']} epochs in "
             f"{summary['seconds'] / 3600:.2f} h. Objective: valid {metric}. Config files: "
             f"{', '.join(Path(f).name for f in summary['config']) or 'none'}; fixed: "
             f"{', '.join(f'{k}={v}' for k, v in inputs['set'].items()) or 'none'}.",
             ""]
    if best is not None:
        test = ", ".join(f"{m} {best['test'][m]:.4f}" for m in shown)
        lines += [f"Best: trial {best['trial']}, valid {metric} {best['value']:.4f}"
                  + (f" (test {test})" if test else "") + ".", ""]
    lines += ["| trial | state | epochs | valid " + metric + " | seconds | " + " | ".join(keys) + " |",
              "|" + "---:|" * 5 + "---:|" * len(keys)]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.4f}"
        params = " | ".join(_shown_value(r["params"].get(k)) for k in keys)
        lines.append(f"| {r['trial']} | {r['state']} | {r['epochs']} | {value} | {r['seconds']:.0f} | {params} |")
    write_text_atomic(root / "trials.md", "\n".join(lines) + "\n")


def _shown_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


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
