"""`mlsa4rec tune`: TPE over a search space file, pruning from the validation curve, a preset out."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from mlsa4rec.cli import EXIT_PAUSED, main
from mlsa4rec.config import build_config
from mlsa4rec.errors import ConfigError
from mlsa4rec.experiments.tune import load_space

FIXED = ["--set", "epochs=4", "--set", "MAX_ITEM_LIST_LENGTH=8", "--set", "train_batch_size=64", "--set",
         "hidden_size=8"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def space(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trials(root: Path) -> list:
    return optuna.load_study(study_name="tune-gru4rec", storage=f"sqlite:///{root / 'tune.db'}").get_trials()


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
    # the same command again has nothing left to do
    assert main(command) == 0 and len(trials(root)) == len(done)


def test_a_paused_trial_is_continued_by_the_same_command(capsys, successor_file: Path, tmp_path: Path) -> None:
    path = space(tmp_path, {"learning_rate": {"type": "choice", "values": [0.01]}})
    root = tmp_path / "tune"
    command = ["-q", "tune", "--model", "gru4rec", "--dataset", str(successor_file), "--space", str(path),
               "--trials", "1", "--dir", str(root), "--pruner", "none", *FIXED]
    assert main([*command, "--time-budget", "1e-9"]) == EXIT_PAUSED
    assert main(command) == 0
    (run,) = (root / "trials").iterdir()
    assert (run / "results.json").is_file() and '"resumed": true' in (run / "results.json").read_text()


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


def test_a_space_whose_corner_the_model_refuses_is_one_error_line(capsys, successor_file: Path,
                                                                  tmp_path: Path) -> None:
    path = space(tmp_path, {"dropout_prob": {"type": "float", "low": 0.5, "high": 1.5}})
    root = tmp_path / "tune"
    assert main(["tune", "--model", "gru4rec", "--dataset", str(successor_file), "--space", str(path),
                 "--trials", "2", "--dir", str(root), *FIXED]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "dropout_prob" in err
    assert not root.exists()
