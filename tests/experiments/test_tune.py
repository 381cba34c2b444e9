"""`mlsa4rec tune`: TPE over a search space file, pruning from the validation curve, a preset out."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import one_error
from mlsa4rec.cli import EXIT_PAUSED, main
from mlsa4rec.config import build_config
from mlsa4rec.errors import ConfigError, MLSA4RecError, RunStopped
from mlsa4rec.experiments import tune as tune_module
from mlsa4rec.experiments.tune import load_space, tune
from mlsa4rec.runs.directory import StageBusy
from mlsa4rec.training import run as run_module

FIXED = ["--set", "epochs=4", "--set", "MAX_ITEM_LIST_LENGTH=8", "--set", "train_batch_size=64", "--set",
         "hidden_size=8"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def space(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trials(root: Path, study: str | None = None) -> list:
    """The trials of ``root``'s study (the last tuning's, which tune.json names, unless ``study`` is given)."""
    name = study or json.loads((root / "tune.json").read_text())["study"]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'tune.db'}").get_trials()


class FakeTrain:
    """``train`` without training: a valid ndcg@10 from the settings, at once (or what ``step`` says);
    records each call's output directory and settings."""

    def __init__(self, step=None) -> None:
        self.calls: list[tuple[Path, dict]] = []
        self.step = step

    def __call__(self, model, dataset, out, config_files, settings, data_dir, **kwargs) -> dict:
        self.calls.append((Path(out), dict(settings)))
        if self.step is not None:
            self.step(len(self.calls), out, kwargs)
        return {"valid": {"ndcg@10": -abs(math.log(settings.get("learning_rate", 0.01) / 0.005))}}


@pytest.fixture
def fake_train(monkeypatch) -> FakeTrain:
    fake = FakeTrain()
    monkeypatch.setattr(run_module, "train", fake)
    return fake


@pytest.fixture
def optuna_records() -> list[logging.LogRecord]:
    """What Optuna logs (it does not propagate to the root logger caplog listens to)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("optuna")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


LR = {"learning_rate": {"type": "log", "low": 1e-3, "high": 3e-2}}


def test_tune_finishes_its_trials_and_writes_a_preset_config_takes(capsys, successor_file: Path,
                                                                   tmp_path: Path) -> None:
    path = space(tmp_path, {"learning_rate": {"type": "log", "low": 1e-3, "high": 3e-2},
                            "dropout_prob": {"type": "float", "low": 0.0, "high": 0.5}})
    root = tmp_path / "tune"
    command = ["-q", "tune", "--model", "gru4rec", "--dataset", str(successor_file), "--space", str(path),
               "--trials", "6", "--dir", str(root), "--pruner", "median", *FIXED]
    assert main(command) == 0
    assert "best: trial" in capsys.readouterr().out
    done = [t for t in trials(root) if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 6 and any(t.state.name == "COMPLETE" for t in done)
    best = max((t for t in done if t.state.name == "COMPLETE"), key=lambda t: t.value)
    preset = yaml.safe_load((root / "best.yaml").read_text())
    assert preset["learning_rate"] == best.params["learning_rate"] and preset["epochs"] == 4
    config = build_config("gru4rec", [root / "best.yaml"])  # the preset is a config file --config takes
    assert config.train.learning_rate == best.params["learning_rate"]
    assert (root / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # pruned trials leave nothing behind; finished ones are run directories
    assert not list((root / "trials").glob(".*.partial"))
    assert len(list((root / "trials").iterdir())) == sum(t.state.name == "COMPLETE" for t in done)
    # the summary: every trial with its outcome, the compute spent, the best with its test metrics
    summary = json.loads((root / "trials.json").read_text())
    assert [r["trial"] for r in summary["trials"]] == [t.number for t in done]
    assert [r["state"] for r in summary["trials"]] == [t.state.name.lower() for t in done]
    assert summary["finished"] == 6 and summary["complete"] + summary["pruned"] == 6 and summary["failed"] == 0
    assert summary["best"]["trial"] == best.number and summary["best"]["value"] == best.value
    ran = json.loads((root / "trials" / best.user_attrs["run"] / "results.json").read_text())
    assert summary["best"]["test"] == ran["test"] and summary["best"]["epochs"] == ran["epochs_run"] == 4
    assert summary["epochs"] == sum(r["epochs"] for r in summary["trials"]) and summary["seconds"] > 0
    table = (root / "trials.md").read_text()
    assert table.count("\n| ") == 6 + 1 and f"Best: trial {best.number}, valid ndcg@10 {best.value:.4f}" in table
    # the same command again has nothing left to do
    assert main(command) == 0 and len(trials(root)) == len(done)


def test_a_paused_trial_is_continued_by_the_same_command(capsys, successor_file: Path, tmp_path: Path) -> None:
    path = space(tmp_path, {"learning_rate": {"type": "choice", "values": [0.01]}})
    root = tmp_path / "tune"
    command = ["-q", "tune", "--model", "gru4rec", "--dataset", str(successor_file), "--space", str(path),
               "--trials", "1", "--dir", str(root), "--pruner", "none", *FIXED]
    assert main([*command, "--time-budget", "1e-9"]) == EXIT_PAUSED
    (row,) = json.loads((root / "trials.json").read_text())["trials"]  # progress is readable while paused
    assert row["state"] == "paused" and row["value"] is None and not (root / "best.yaml").exists()
    assert main(command) == 0
    (run,) = (root / "trials").iterdir()
    assert (run / "results.json").is_file() and '"resumed": true' in (run / "results.json").read_text()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_a_trial_whose_worker_stopped_here_is_continued_at_once_before_any_new_draw(successor_file: Path,
                                                                                   tmp_path: Path, sig) -> None:
    """Killed (no heartbeat has gone stale yet) or interrupted, its settings are trained on from the checkpoint."""
    path = space(tmp_path, LR)
    root = tmp_path / "tune"
    command = ["-q", "tune", "--model", "gru4rec", "--dataset", str(successor_file), "--space", str(path),
               "--trials", "1", "--dir", str(root), "--pruner", "none", *FIXED, "--set", "epochs=30",
               "--set", "stopping_step=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    first = subprocess.Popen([sys.executable, "-m", "mlsa4rec", *command], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,  # Ctrl-C as a terminal gives it, even in the background
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not [log for log in root.glob("trials/.*.partial/train.log") if "epoch   3" in log.read_text()]:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        first.send_signal(sig)
        first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130, signal.SIGTERM: 75}[sig]
    killed = trials(root)[0].params  # (Ctrl-C queues its settings again at once: a second, waiting trial)
    started = time.monotonic()
    assert main(command) == 0
    assert time.monotonic() - started < 120  # no heartbeat waited for
    (run,) = (root / "trials").iterdir()  # no second setting drawn beside it
    assert json.loads((run / "results.json").read_text())["resumed"]
    assert [t.params for t in trials(root) if t.state.name == "COMPLETE"] == [killed]


def test_a_second_ctrl_c_while_an_interrupted_trial_is_queued_again_does_not_lose_it(
        successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    def interrupted(n, out, kwargs):
        raise KeyboardInterrupt  # the first Ctrl-C, during training

    monkeypatch.setattr(run_module, "train", FakeTrain(step=interrupted))
    enqueue = optuna.Study.enqueue_trial

    def enqueue_under_a_second_ctrl_c(self, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return enqueue(self, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", enqueue_under_a_second_ctrl_c)
    root = tmp_path / "tune"
    # Ctrl-C as a terminal gives it (a shell's background job, as CI may run us, starts with it ignored)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            tune("gru4rec", str(successor_file), space(tmp_path, LR), 1, root)
    finally:
        signal.signal(signal.SIGINT, outer)
    (interrupted_trial, queued) = trials(root)
    assert queued.state.name == "WAITING" and queued.system_attrs["fixed_params"] == interrupted_trial.params


@pytest.mark.parametrize(("spec", "message"), [
    ({"learning_rat": {"type": "log", "low": 1e-4, "high": 1e-2}}, "unknown config key 'learning_rat'"),
    ({"learning_rate": {"type": "log", "low": 1e-2, "high": 1e-2}}, "is empty"),
    ({"learning_rate": {"type": "log", "low": 0.0, "high": 1e-2}}, "not positive"),
    ({"hidden_size": {"type": "choice", "values": []}}, "non-empty list"),
    ({"hidden_size": {"type": "normal", "low": 1, "high": 2}}, "must be {type: log"),
    ({}, "is empty"),
])
def test_a_bad_search_space_is_refused_before_any_trial(tmp_path: Path, spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_space(space(tmp_path, spec), "gru4rec")


def test_a_missing_space_file_is_named_as_the_space_not_a_config_file(tmp_path: Path) -> None:
    """Not taken for a packaged preset either: a preset is settings, not a space."""
    with pytest.raises(ConfigError, match=r"^search space '.*nope\.yaml' does not exist; check the path \(--space\)$"):
        load_space(tmp_path / "nope.yaml", "gru4rec")
    with pytest.raises(ConfigError, match=r"^search space 'sasrec-ml-1m' does not exist"):
        load_space("sasrec-ml-1m", "sasrec")
    with pytest.raises(ConfigError, match=r"^search space '.*' is a directory; pass a YAML file \(--space\)$"):
        load_space(tmp_path, "gru4rec")


def test_a_space_whose_corner_the_model_refuses_is_one_error_line(capsys, successor_file: Path,
                                                                  tmp_path: Path) -> None:
    path = space(tmp_path, {"dropout_prob": {"type": "float", "low": 0.5, "high": 1.5}})
    root = tmp_path / "tune"
    assert main(["tune", "--model", "gru4rec", "--dataset", str(successor_file), "--space", str(path),
                 "--trials", "2", "--dir", str(root), *FIXED]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "dropout_prob" in err
    assert not root.exists()


# --- the reviewer's defects (issue: tune loops, seeds, reuse, debris, budget, stale trials) -----------

def test_settings_the_model_refuses_together_stop_after_3_failed_trials_in_one_line(
        capsys, successor_file: Path, tmp_path: Path, optuna_records: list) -> None:
    """Every corner passes the pre-check (with hidden_size=12, n_heads=3 fixed), every combination fails."""
    path = space(tmp_path, {"hidden_size": {"type": "choice", "values": [9, 15]},
                            "n_heads": {"type": "choice", "values": [2, 4]}})
    root = tmp_path / "tune"
    one_error(capsys, ["-q", "tune", "--model", "sasrec", "--dataset", str(successor_file), "--space", str(path),
                       "--trials", "5", "--dir", str(root), "--set", "hidden_size=12", "--set", "n_heads=3"],
              "3 trials in a row failed", "must be divisible by n_heads", "narrow the search space")
    assert [t.state.name for t in trials(root)] == ["FAIL"] * 3
    assert not [r for r in optuna_records if r.levelno >= logging.WARNING]  # no traceback of Optuna's


def test_a_worker_draws_at_random_unless_seeded(fake_train: FakeTrain, successor_file: Path, tmp_path: Path) -> None:
    path = space(tmp_path, LR)

    def first_settings(root: str, **kwargs) -> list[float]:
        before = len(fake_train.calls)
        tune("gru4rec", str(successor_file), path, 2, tmp_path / root, pruner="none", **kwargs)
        return [s["learning_rate"] for _, s in fake_train.calls[before:]]

    assert first_settings("a", seed=7) == first_settings("b", seed=7)  # one worker's search, reproducible
    assert first_settings("c") != first_settings("d")  # two workers of one tuning: different draws


@pytest.mark.parametrize("seed", [-1, 2 ** 32, True, 1.5, "3"])
def test_a_bad_seed_is_one_error_before_the_directory_is_made(fake_train: FakeTrain, successor_file: Path,
                                                              tmp_path: Path, seed) -> None:
    with pytest.raises(MLSA4RecError, match=r"--seed must be an integer from 0 to 4294967295, or left out"):
        tune("gru4rec", str(successor_file), space(tmp_path, LR), 1, tmp_path / "tune", seed=seed)
    assert not (tmp_path / "tune").exists() and not fake_train.calls


def test_settings_another_worker_trains_do_not_count_as_a_finished_trial(
        fake_train: FakeTrain, successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    def busy_first(call: int, out: Path, kwargs: dict) -> None:
        if call == 1:
            raise StageBusy(f"{out} is being trained by another process")

    fake_train.step = busy_first
    monkeypatch.setattr(tune_module, "BUSY_WAIT_S", 0.0)
    root = tmp_path / "tune"
    best = tune("gru4rec", str(successor_file), space(tmp_path, LR), 1, root)
    assert len(fake_train.calls) == 2
    skipped, done = trials(root)
    assert skipped.state.name == "PRUNED" and skipped.user_attrs["skipped"] and done.state.name == "COMPLETE"
    assert best["trial"] == done.number


def test_a_tuning_whose_trials_were_all_pruned_ends_with_one_error_line(capsys, fake_train: FakeTrain,
                                                                       successor_file: Path, tmp_path: Path) -> None:
    def pruned(call: int, out: Path, kwargs: dict) -> None:
        raise RunStopped("pruned at epoch 1")

    fake_train.step = pruned
    root = tmp_path / "tune"
    one_error(capsys, ["-q", "tune", "--model", "gru4rec", "--dataset", str(successor_file), "--space",
                       str(space(tmp_path, LR)), "--trials", "2", "--dir", str(root)],
              "no trial completed;", "--pruner none")
    assert [t.state.name for t in trials(root)] == ["PRUNED"] * 2 and not (root / "best.yaml").exists()


def test_a_tuning_with_other_inputs_in_the_same_directory_never_reuses_the_first_ones_trials(
        fake_train: FakeTrain, successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    path = space(tmp_path, LR)
    config = tmp_path / "base.yaml"
    config.write_text("epochs: 4\n")
    root = tmp_path / "tune"

    def run(*configs: str, **fixed) -> tuple[dict, list[Path]]:
        before = len(fake_train.calls)
        best = tune("gru4rec", str(successor_file), path, 2, root, config_files=list(configs), overrides=fixed,
                    seed=3, pruner="none")
        return best, [out for out, _ in fake_train.calls[before:]]

    first, first_runs = run(str(config))
    monkeypatch.chdir(tmp_path)
    again, again_runs = run("base.yaml")  # the same file by another name: the same tuning, nothing to do
    assert again["study"] == first["study"] and not again_runs
    other, other_runs = run(str(config), epochs=3)  # the same draws (seed 3), other fixed settings
    assert other["study"] != first["study"] and len(other_runs) == 2
    assert not set(first_runs) & set(other_runs)
    assert {t.number for t in trials(root, first["study"])} == {t.number for t in trials(root, other["study"])}
    recorded = json.loads((root / "tune.json").read_text())
    assert recorded["study"] == other["study"] and recorded["set"] == {"epochs": 3}
    assert recorded["dataset"] == str(successor_file.resolve()) and recorded["config"] == [
        {"file": str(config.resolve()), "settings": {"epochs": 4}}]
    header = (root / "best.yaml").read_text().splitlines()[:2]
    # shown relative to the working directory (tmp_path here), so a committed preset names no machine's folders
    assert other["study"] in header[0] and "--config base.yaml --config tune/best.yaml" in header[1]
    preset = build_config("gru4rec", [config, root / "best.yaml"])  # as the header says
    assert preset.train.epochs == 3 and preset.train.learning_rate == other["params"]["learning_rate"]


def test_a_dir_that_is_a_file_is_refused_and_changed_in_nothing(capsys, successor_file: Path,
                                                               tmp_path: Path) -> None:
    root = tmp_path / "tune"
    root.write_text("mine\n")
    one_error(capsys, ["tune", "--model", "gru4rec", "--dataset", str(successor_file), "--space",
                       str(space(tmp_path, LR)), "--trials", "1", "--dir", str(root)], "is not a directory")
    assert root.read_text() == "mine\n"


def test_a_study_that_cannot_be_created_leaves_no_directory(capsys, successor_file: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    def broken(**kwargs):
        raise RuntimeError("database is locked\nmore detail")

    monkeypatch.setattr(optuna, "create_study", broken)
    one_error(capsys, ["tune", "--model", "gru4rec", "--dataset", str(successor_file), "--space",
                       str(space(tmp_path, LR)), "--trials", "1", "--dir", str(tmp_path / "a" / "tune")],
              "cannot create the tuning study", "database is locked")
    assert not (tmp_path / "a").exists()


def test_no_trial_starts_once_the_time_budget_is_spent(fake_train: FakeTrain, successor_file: Path,
                                                      tmp_path: Path) -> None:
    fake_train.step = lambda call, out, kwargs: time.sleep(0.5)  # a trial that finished as the budget ran out
    root = tmp_path / "tune"
    assert tune("gru4rec", str(successor_file), space(tmp_path, LR), 3, root, time_budget_s=0.3) is None
    assert len(fake_train.calls) == 1 and [t.state.name for t in trials(root)] == ["COMPLETE"]


@pytest.mark.parametrize("ending", ["returns", "is pruned"])
def test_a_trial_another_worker_marked_stale_is_a_warning_and_the_tuning_goes_on(
        fake_train: FakeTrain, successor_file: Path, tmp_path: Path, caplog, ending: str) -> None:
    root = tmp_path / "tune"

    def failed_by_another_worker(call: int, out: Path, kwargs: dict) -> None:
        if call == 1:  # what fail_stale_trials does in a worker that took this one for dead
            other = optuna.load_study(study_name=json.loads((root / "tune.json").read_text())["study"],
                                      storage=f"sqlite:///{root / 'tune.db'}")
            (running,) = other.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            other._storage.set_trial_state_values(running._trial_id, optuna.trial.TrialState.FAIL)
            if ending == "is pruned":
                raise RunStopped("pruned at epoch 1")

    fake_train.step = failed_by_another_worker
    with caplog.at_level(logging.WARNING, logger="mlsa4rec"):
        best = tune("gru4rec", str(successor_file), space(tmp_path, LR), 1, root)
    assert "Cannot tell a FAIL trial" in caplog.text and "going on" in caplog.text
    assert len(fake_train.calls) == 2 and [t.state.name for t in trials(root)] == ["FAIL", "COMPLETE"]
    assert best["trial"] == 1


def test_a_resumed_seeded_tuning_counts_each_setting_once(fake_train: FakeTrain, successor_file: Path,
                                                          tmp_path: Path) -> None:
    """A seeded sampler replays its first draws when the same command runs again: the replayed settings
    are not new trials, so --trials N means N settings however often the tuning was paused."""
    path, root = space(tmp_path, LR), tmp_path / "tune"
    tune("gru4rec", str(successor_file), path, 2, root, pruner="none", seed=7)
    tune("gru4rec", str(successor_file), path, 4, root, pruner="none", seed=7)
    summary = json.loads((root / "trials.json").read_text())
    assert summary["finished"] == 4 and len(summary["trials"]) == 4
    assert len({s["learning_rate"] for _, s in fake_train.calls}) == 4
    repeated = [t for t in trials(root) if "repeat_of" in t.user_attrs]
    assert [t.user_attrs["repeat_of"] for t in repeated] == [0, 1]  # the replay of the first call's two


def test_a_space_with_fewer_settings_than_trials_stops_when_draws_repeat(fake_train: FakeTrain, successor_file: Path,
                                                                        tmp_path: Path, caplog) -> None:
    path = space(tmp_path, {"learning_rate": {"type": "choice", "values": [0.001, 0.01]}})
    with caplog.at_level(logging.WARNING, logger="mlsa4rec"):
        best = tune("gru4rec", str(successor_file), path, 5, tmp_path / "tune", pruner="none", seed=3)
    assert best is not None and json.loads((tmp_path / "tune" / "trials.json").read_text())["finished"] == 2
    assert "holds fewer than 5 settings" in caplog.text
