"""Tracking a run while it trains (issue 25, part 3): each epoch's scalars in TensorBoard (by default
when installed, in RUN/tensorboard/) and MLflow (``--tracking mlflow``), one curve across a resume,
an unusable choice refused before training, and train.log ending with the test metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from conftest import one_error
from mlsa4rec.cli import main
from mlsa4rec.errors import MLSA4RecError, TimeBudgetSpent
from mlsa4rec.evaluation import evaluator
from mlsa4rec.runs.directory import MANIFEST, TENSORBOARD, staging_dir
from mlsa4rec.training import tracking
from mlsa4rec.training.run import preflight, train
from mlsa4rec.training.tracking import MLFLOW_RUN_FILE, mlflow_key

SMALL = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "hidden_dropout_prob": 0.2,
         "attn_dropout_prob": 0.2, "MAX_ITEM_LIST_LENGTH": 8, "learning_rate": 0.01, "epochs": 3,
         "train_batch_size": 32, "stopping_step": 100, "seed": 11, "eval_batch_size": 64, "lr_scheduler": "cosine"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for ``run`` (its purge of logged-again steps applied): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / TENSORBOARD))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def losses(results: dict) -> list[tuple[int, float]]:
    return [(row["epoch"], pytest.approx(row["loss"], rel=1e-6)) for row in results["history"]]


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch) -> str:
    """A file store in tmp_path (MLflow 3 keeps it behind MLFLOW_ALLOW_FILE_STORE; it is the fastest to create)."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def mlflow_runs(uri: str, experiment: str = "succ") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def metric(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


# --- TensorBoard ------------------------------------------------------------------------------------

def test_tensorboard_holds_every_epochs_scalars_and_the_manifest_lists_them(capsys, successor_file: Path,
                                                                             tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    results = train("sasrec", str(successor_file), out, overrides=SMALL)
    seen = scalars(out)
    assert seen["train/loss"] == losses(results)
    assert [step for step, _ in seen["train/lr"]] == [1, 2, 3]
    assert {f"valid/{k}" for k in results["valid"]} | {"time/train_seconds", "time/eval_seconds",
                                                       "memory/peak_bytes"} <= set(seen)
    assert seen["valid/ndcg@10"] == [(row["epoch"], pytest.approx(row["valid"]["ndcg@10"], rel=1e-6))
                                     for row in results["history"]]
    assert all(row["peak_memory_bytes"] > 0 for row in results["history"])  # CPU: the process's peak RSS
    assert seen["test/hit@10"] == [(results["best_epoch"], pytest.approx(results["test"]["hit@10"], rel=1e-6))]
    listed = [name for name in json.loads((out / MANIFEST).read_text())["files"] if "/" in name]
    assert listed and sorted(listed) == sorted(f"{TENSORBOARD}/{p.name}" for p in (out / TENSORBOARD).iterdir())
    # `mlsa4rec evaluate` of a run holding tensorboard/ verifies it and gives the same metrics
    assert main(["evaluate", "--run-dir", str(out), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == pytest.approx(results["test"], abs=1e-9)


def test_tracking_none_writes_no_tensorboard_folder(successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 1}, tracking="none")
    assert not (out / TENSORBOARD).exists()
    assert all("/" not in name for name in json.loads((out / MANIFEST).read_text())["files"])


def test_train_log_ends_with_the_best_epochs_valid_and_test_metrics(successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 2}, tracking="none")
    *_, valid, test = (out / "train.log").read_text().splitlines()
    assert f"best epoch {results['best_epoch']} | valid hit@5 {results['valid']['hit@5']:.4f}" in valid
    assert f"best epoch {results['best_epoch']} | test hit@5 {results['test']['hit@5']:.4f}" in test
    assert all(f"{k} {v:.4f}" in test for k, v in results["test"].items())


def test_a_tracker_failing_mid_run_is_dropped_with_a_warning(successor_file: Path, tmp_path: Path, monkeypatch,
                                                             caplog) -> None:
    pytest.importorskip("tensorboard")
    real = tracking.TensorBoardTracker.log_epoch

    def full_disk_at_epoch_2(self, row: dict) -> None:
        if row["epoch"] == 2:
            raise OSError(28, "No space left on device")
        real(self, row)

    monkeypatch.setattr(tracking.TensorBoardTracker, "log_epoch", full_disk_at_epoch_2)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="mlsa4rec"):
        results = train("sasrec", str(successor_file), out, overrides=SMALL)
    assert results["epochs_run"] == 3 and "TensorBoard tracking stopped: logging epoch 2 failed" in caplog.text
    assert [step for step, _ in scalars(out)["train/loss"]] == [1]  # closed, listed, verified: the run loads
    assert main(["evaluate", "--run-dir", str(out), "-q"]) == 0


# --- MLflow -------------------------------------------------------------------------------------------

def test_mlflow_gets_the_settings_every_epoch_and_the_final_metrics(successor_file: Path, tmp_path: Path,
                                                                    mlflow_uri: str) -> None:
    out = tmp_path / "run"
    results = train("sasrec", str(successor_file), out, overrides=SMALL, tracking="mlflow", tracking_uri=mlflow_uri)
    (run,) = mlflow_runs(mlflow_uri)
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert run.data.params == {mlflow_key(k): v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    assert run.data.params["hidden_size"] == "16" and run.data.params["model"] == "sasrec"
    assert metric(mlflow_uri, run.info.run_id, "train/loss") == losses(results)
    assert [s for s, _ in metric(mlflow_uri, run.info.run_id, "valid/ndcg_at_10")] == [1, 2, 3]
    for split, prefix in (("test", "test"), ("valid", "best_valid")):
        for k, v in results[split].items():
            assert run.data.metrics[f"{prefix}/{mlflow_key(k)}"] == pytest.approx(v, rel=1e-12), (split, k)
    assert run.data.metrics["best_epoch"] == results["best_epoch"]
    assert (out / TENSORBOARD).is_dir() == tracking.check_tracking("auto")[0]  # TensorBoard too when installed
    assert not (out / MLFLOW_RUN_FILE).exists() and not staging_dir(out).exists()


def test_a_resumed_run_continues_one_curve_and_one_mlflow_run(successor_file: Path, tmp_path: Path,
                                                              mlflow_uri: str) -> None:
    """Paused at once (time budget), then stopped right after epoch 2 was logged and checkpointed
    (Ctrl-C), then finished: TensorBoard shows each epoch once, MLflow one run with each step once."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    kwargs = {"overrides": SMALL, "tracking": "mlflow", "tracking_uri": mlflow_uri}
    with pytest.raises(TimeBudgetSpent):
        train("sasrec", str(successor_file), out, time_budget_s=1e-9, **kwargs)
    saved = json.loads((staging_dir(out) / MLFLOW_RUN_FILE).read_text())
    (paused,) = mlflow_runs(mlflow_uri)
    assert paused.info.run_id == saved["run_id"] and paused.info.status == "KILLED"

    def stop_after_epoch_2(row: dict) -> None:
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("sasrec", str(successor_file), out, resume=True, on_epoch=stop_after_epoch_2, **kwargs)
    assert [s for s, _ in scalars(staging_dir(out))["train/loss"]] == [1, 2]
    results = train("sasrec", str(successor_file), out, resume=True, **kwargs)
    assert results["epochs_run"] == 3 and scalars(out)["train/loss"] == losses(results)
    (run,) = mlflow_runs(mlflow_uri)
    assert run.info.run_id == saved["run_id"] and run.info.status == "FINISHED"
    assert metric(mlflow_uri, run.info.run_id, "train/loss") == losses(results)
    assert len(list((out / TENSORBOARD).iterdir())) == 3  # one event file per command, all listed and verified
    assert main(["evaluate", "--run-dir", str(out), "-q"]) == 0


def test_a_resumed_run_whose_mlflow_run_is_gone_starts_a_new_one_and_says_so(successor_file: Path, tmp_path: Path,
                                                                            mlflow_uri: str, caplog) -> None:
    out = tmp_path / "run"
    kwargs = {"overrides": SMALL, "tracking": "mlflow", "tracking_uri": mlflow_uri}
    with pytest.raises(TimeBudgetSpent):
        train("sasrec", str(successor_file), out, time_budget_s=1e-9, **kwargs)
    (staging_dir(out) / MLFLOW_RUN_FILE).write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": mlflow_uri}))
    with caplog.at_level(logging.WARNING, logger="mlsa4rec"):
        results = train("sasrec", str(successor_file), out, resume=True, **kwargs)
    assert f"the MLflow run {'0' * 32} of the interrupted run was not found" in caplog.text
    new = [r for r in mlflow_runs(mlflow_uri) if r.info.status == "FINISHED"]
    assert len(new) == 1 and metric(mlflow_uri, new[0].info.run_id, "train/loss") == losses(results)



def test_a_run_paused_with_mlflow_and_resumed_without_publishes_no_mlflow_file(successor_file: Path,
                                                                              tmp_path: Path,
                                                                              mlflow_uri: str) -> None:
    """--tracking none on --resume never closes an MLflow tracker: the stage's mlflow-run.json must
    still not be published (--overwrite would then refuse the run as holding a foreign file)."""
    out = tmp_path / "run"
    with pytest.raises(TimeBudgetSpent):
        train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 1}, tracking="mlflow",
              tracking_uri=mlflow_uri, time_budget_s=1e-9)
    assert (staging_dir(out) / MLFLOW_RUN_FILE).is_file()  # kept while paused: --resume continues the MLflow run
    train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 1}, resume=True, tracking="none")
    assert not (out / MLFLOW_RUN_FILE).exists() and not staging_dir(out).exists()
    results = train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 1}, overwrite=True,
                    tracking="none")
    assert results["run_dir"] == str(out.resolve()) and not results["resumed"]


def test_an_mlflow_tracker_dropped_mid_run_leaves_no_mlflow_file_in_the_run(successor_file: Path, tmp_path: Path,
                                                                           mlflow_uri: str, monkeypatch) -> None:
    def store_gone(self, row: dict) -> None:
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(tracking.MLflowTracker, "log_epoch", store_gone)
    out = tmp_path / "run"
    train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 1}, tracking="mlflow",
          tracking_uri=mlflow_uri)
    assert not (out / MLFLOW_RUN_FILE).exists()
    assert main(["evaluate", "--run-dir", str(out), "-q"]) == 0

# --- refused before training -----------------------------------------------------------------------------

def test_an_unusable_tracking_choice_is_one_error_line_before_training(capsys, successor_file: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    monkeypatch.setattr(tracking, "_installed", lambda package: False)
    command = ["train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir", str(tmp_path / "run"),
               "--set", "epochs=1", "--set", "hidden_size=8", "--set", "n_heads=1"]
    one_error(capsys, [*command, "--tracking", "mlflow"], "--tracking mlflow needs the mlflow package",
              "pip install 'mlsa4rec[mlflow]'")
    one_error(capsys, [*command, "--tracking", "tensorboard"], "pip install 'mlsa4rec[tensorboard]'")
    one_error(capsys, [*command, "--tracking-uri", "http://localhost:5000"], "pass it with --tracking mlflow")
    one_error(capsys, [*command, "--nproc", "2", "--tracking", "mlflow"], "pip install 'mlsa4rec[mlflow]'")  # preflight
    with pytest.raises(MLSA4RecError, match="must be one of auto, tensorboard, mlflow, none"):
        preflight("sasrec", str(successor_file), tmp_path / "run", tracking="wandb")
    assert sorted(p.name for p in tmp_path.iterdir()) == [successor_file.name]
    assert main([*command, "-q"]) == 0 and not (tmp_path / "run" / TENSORBOARD).exists()  # auto: quietly nothing


def test_a_tracking_store_mlflow_refuses_is_one_error_line_and_leaves_nothing(capsys, successor_file: Path,
                                                                              tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    one_error(capsys, ["train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir",
                       str(tmp_path / "run"), "--set", "epochs=1", "--tracking", "mlflow", "--tracking-uri",
                       "nosuch://store"], "cannot use the MLflow tracking store 'nosuch://store'")
    assert sorted(p.name for p in tmp_path.iterdir()) == [successor_file.name]


# --- validation's progress bar ---------------------------------------------------------------------------

def test_validation_shows_a_progress_bar_on_a_terminal_of_rank_0_only(successor_file: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    bars: list[dict] = []
    real = evaluator.tqdm

    def recorded(*args, **kwargs):
        bars.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluator, "tqdm", recorded)
    train("sasrec", str(successor_file), tmp_path / "run", overrides={**SMALL, "epochs": 1}, tracking="none")
    assert [b["desc"] for b in bars] == ["valid", "valid", "test"]  # the epoch's validation, then the best's
    assert all(b["disable"] is None and b["leave"] is False for b in bars)  # shown only where stderr is a terminal
    assert all(b["total"] == 5 for b in bars)  # 300 users in batches of 64
