"""`mlsa4rec study`: a grid worked through on Optuna, by one worker or several, in slices, with
workers that die; its status and report; and the study files it refuses before training anything."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mlsa4rec.cli import EXIT_PAUSED, main
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.experiments import study as study_module
from mlsa4rec.experiments.report import build_report
from mlsa4rec.experiments.study import cell_config, load_study, read_record, study_status
from mlsa4rec.training.run import train

TINY = {"hidden_size": 8, "MAX_ITEM_LIST_LENGTH": 8, "epochs": 2, "train_batch_size": 64, "eval_batch_size": 64}
SASREC = {**TINY, "inner_size": 16, "n_layers": 1, "n_heads": 1}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_study(tmp_path: Path, data: Path, **changes) -> Path:
    spec = {"study": "tiny", "directory": "out", "datasets": [str(data)], "seeds": [1, 2], "baseline": "sasrec",
            "models": {"sasrec": {"set": SASREC}, "gru4rec": {"set": TINY}}, **changes}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def default_signals() -> None:
    """In the child: Ctrl-C and SIGTERM as a terminal gives them (a test run in the background ignores SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def worker(study: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    return subprocess.Popen([sys.executable, "-m", "mlsa4rec", "-q", "study", "run", str(study), *args],
                            cwd=study.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)


def trials(root: Path) -> list:
    import optuna

    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{root / 'study.db'}").get_trials()


def trainings(run: Path) -> int:
    """How many times the run's log says training started from scratch or from a checkpoint."""
    text = (run / "train.log").read_text()
    return text.count("training ") + text.count("resuming the interrupted run")


def test_a_study_runs_reports_and_every_number_comes_from_its_runs(capsys, successor_file: Path,
                                                                   tmp_path: Path, monkeypatch) -> None:
    study = write_study(tmp_path, successor_file,
                        groups={"long": {"models": ["sasrec"], "seeds": [1], "set": {"MAX_ITEM_LIST_LENGTH": 16}}})
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study)]) == 0
    root = tmp_path / "out"
    rows = study_status(root)
    assert [r["state"] for r in rows] == ["done"] * 5 and all(r["epochs"] == 2 for r in rows)
    capsys.readouterr()
    assert main(["study", "status", str(root)]) == 0
    assert "5 done" in capsys.readouterr().out
    assert main(["study", "report", str(root)]) == 0
    figures = {p.name for p in (root / "report").iterdir()}
    assert {"report.md", "bars-ndcg10.png", "bars-ndcg10.svg", "ndcg10-vs-length.svg",
            "cost-vs-length.svg"} <= figures
    report = json.loads((root / "report" / "report.json").read_text())
    # the bars keep a group's cells apart; against L a group that changes only L continues its model's series
    assert {(c["model"], c["length_series"]) for c in report["cells"]} == {
        ("sasrec", "sasrec"), ("gru4rec", "gru4rec"), ("sasrec (long)", "sasrec")}
    assert report["file"] == study.name  # under the working directory: named as a repository names it
    for cell in report["cells"]:  # the report's test metrics are the runs' own
        results = json.loads((Path(cell["run"]) / "results.json").read_text())
        assert cell["metrics"]["test"]["ndcg@10"] == pytest.approx(results["test"]["ndcg@10"], abs=1e-6)
    table, long = report["tables"]
    assert (long["group"], [r["model"] for r in long["rows"]], long["comparisons"]) == ("long", ["sasrec"], [])
    assert {r["model"] for r in table["rows"]} == {"sasrec", "gru4rec"} and table["baseline"] == "sasrec"
    assert [c["metric"] for c in table["comparisons"]] == ["hit@10", "ndcg@10", "mrr@10"]
    assert all(c["seeds"] == [1, 2] and c["p_holm"] >= c["p_value"] for c in table["comparisons"])
    # a record carries what the report needs, small enough to commit, and is checked when read
    record = root / "records" / "main" / "sasrec" / "succ" / "seed-1.npz"
    assert record.stat().st_size < 64_000
    meta, arrays = read_record(record)
    assert meta["settings"]["seed"] == 1 and len(arrays["ranks_ranked"]) == len(arrays["ranks_excluded"]) == 300
    # both history rules and the longest-history quarter, from the records, equal to the runs' own ranks
    from mlsa4rec.data import load_dataset
    from mlsa4rec.evaluation.runs import run_ranks
    from mlsa4rec.metrics import metrics_from_ranks
    from mlsa4rec.runs.loading import load_run

    data = load_dataset(str(successor_file))
    targets = data.eval_targets("test")
    lengths = targets - data.history_start(targets)
    assert np.array_equal(arrays["history_lengths"], lengths)
    longest = lengths >= np.quantile(lengths, 0.75, method="lower")
    assert table["longest"] == {"users": int(longest.sum()), "of": 300, "min_history": int(lengths[longest].min())}
    row = next(r for r in table["rows"] if r["model"] == "sasrec")
    runs = [load_run(tmp_path / "out" / "runs" / "main" / "sasrec" / "succ" / f"seed-{s}") for s in (1, 2)]
    for key, ranks in (("metrics_excluded", [run_ranks(r, "test", True) for r in runs]),
                       ("metrics_longest", [run_ranks(r, "test", False)[longest] for r in runs])):
        expected = [metrics_from_ranks(np.minimum(r, 255), [10])["ndcg@10"] for r in ranks]
        assert row[key]["ndcg@10"][0] == pytest.approx(np.mean(expected)), key
        assert row[key]["ndcg@10"][1] == pytest.approx(np.std(expected, ddof=1)), key
    # that quarter's own paired tests: each model's mean there, the baseline's, Holm within them
    on_longest = {c["metric"]: c for c in table["comparisons_longest"]}
    gru4rec = next(r for r in table["rows"] if r["model"] == "gru4rec")
    assert list(on_longest) == ["hit@10", "ndcg@10", "mrr@10"]
    for metric, c in on_longest.items():
        assert (c["model"], c["seeds"]) == ("gru4rec", [1, 2]) and c["p_holm"] >= c["p_value"]
        assert c["baseline"] == pytest.approx(row["metrics_longest"][metric][0])
        assert c["candidate"] == pytest.approx(gru4rec["metrics_longest"][metric][0])
    text = (root / "report" / "report.md").read_text()
    assert "The other history rule" in text and "The quarter of users with the longest histories" in text
    assert "Against `sasrec` on this quarter alone" in text
    # the run directories can go: the report is rebuilt from the records alone
    import shutil

    shutil.rmtree(root / "runs")
    again = build_report(root)
    assert [t["rows"] for t in again["tables"]] == [t["rows"] for t in build_report(root)["tables"]]
    assert again["tables"][0]["comparisons"] == table["comparisons"]
    # running it again trains nothing
    assert main(["-q", "study", "run", str(study)]) == 0 and not (root / "runs").exists()


def test_two_workers_share_the_grid_and_train_each_cell_once(successor_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text(successor_file.read_text())
    study = write_study(tmp_path, successor_file, datasets=[str(successor_file), str(other)])
    workers = [worker(study, "--no-wait"), worker(study, "--no-wait")]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    root = tmp_path / "out"
    cells = [c.id for c in load_study(study, root, check=False).cells]
    assert len(cells) == 8 and [r["state"] for r in study_status(root)] == ["done"] * 8
    complete = [t.user_attrs["cell"] for t in trials(root) if t.state.name == "COMPLETE"]
    assert sorted(complete) == sorted(cells)  # each cell completed by exactly one trial
    assert all(trainings(root / "runs" / cell) == 1 for cell in cells)


def test_a_killed_worker_s_cell_is_continued_from_its_checkpoint(successor_file: Path, tmp_path: Path) -> None:
    long = {**SASREC, "epochs": 30, "stopping_step": 100}
    study = write_study(tmp_path, successor_file, seeds=[1], models={"sasrec": {"set": long}})
    root = tmp_path / "out"
    first = worker(study, "--heartbeat", "1")
    stage = root / "runs" / "main" / "sasrec" / "succ" / ".seed-1.partial"
    deadline = time.monotonic() + 300
    while not (stage / "checkpoint.pt").is_file() or "epoch   3" not in (stage / "train.log").read_text():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = worker(study, "--heartbeat", "1")
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-2000:]
    run = root / "runs" / "main" / "sasrec" / "succ" / "seed-1"
    results = json.loads((run / "results.json").read_text())
    assert results["resumed"] and results["epochs_run"] == 30
    states = sorted(t.state.name for t in trials(root))
    assert states == ["COMPLETE", "FAIL"]  # the dead worker's trial went stale and was queued again
    whole = train("sasrec", str(successor_file), tmp_path / "whole", overrides={**long, "seed": 1})
    assert results["test"] == whole["test"] and results["valid"] == whole["valid"]


def killed_at_epoch_3(study: Path, root: Path, sig: int) -> subprocess.CompletedProcess:
    """Start a worker, send it ``sig`` once its first cell (sasrec) has checkpointed epoch 3."""
    first = worker(study)
    try:
        stage = root / "runs" / "main" / "sasrec" / "succ" / ".seed-1.partial"
        deadline = time.monotonic() + 300
        while not (stage / "checkpoint.pt").is_file() or "epoch   3" not in (stage / "train.log").read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        first.send_signal(sig)
        out, err = first.communicate(timeout=60)
    finally:
        first.kill()
    return subprocess.CompletedProcess(first.args, first.returncode, out, err)


@pytest.mark.parametrize("sig, state, code", [(signal.SIGKILL, "paused", -signal.SIGKILL),
                                              (signal.SIGINT, "waiting", 130), (signal.SIGTERM, "waiting", 75)])
def test_a_worker_stopped_here_has_its_cell_continued_first_at_once(successor_file: Path, tmp_path: Path,
                                                                     monkeypatch, sig, state, code) -> None:
    """With the default heartbeat a dead worker's trial goes stale only after 3 minutes; a worker on
    the same machine knows at once that the process is gone, and continues its cell before any other."""
    long = {**SASREC, "epochs": 30, "stopping_step": 100}
    study = write_study(tmp_path, successor_file, seeds=[1], models={"sasrec": {"set": long}, "gru4rec": {"set": TINY}})
    root = tmp_path / "out"
    stopped = killed_at_epoch_3(study, root, sig)
    assert stopped.returncode == code, stopped.stderr[-2000:]
    if sig == signal.SIGTERM:  # a pause at the next step, at a checkpoint, not the loss of the epoch
        assert "paused: SIGTERM received" in stopped.stderr
    rows = {r["cell"]: r for r in study_status(root)}
    killed = rows["main/sasrec/succ/seed-1"]
    assert killed["state"] == state and killed["epochs"] >= 2  # its checkpoint; not "running" (SIGKILL), not "failed"
    if sig == signal.SIGKILL:
        assert "has stopped" in killed["error"] and "study run" in killed["error"]
    assert rows["main/gru4rec/succ/seed-1"]["state"] == "waiting"
    trained = []
    real_run_cell = study_module.run_cell
    monkeypatch.setattr(study_module, "run_cell", lambda cell, *a: trained.append(cell.id) or real_run_cell(cell, *a))
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    assert main(["-q", "study", "run", str(study), "--no-wait"]) == 0
    assert time.monotonic() - started < 120  # no heartbeat waited for
    assert trained == ["main/sasrec/succ/seed-1", "main/gru4rec/succ/seed-1"]
    assert [r["state"] for r in study_status(root)] == ["done", "done"]
    results = json.loads((root / "runs" / "main" / "sasrec" / "succ" / "seed-1" / "results.json").read_text())
    assert results["resumed"] and results["epochs_run"] == 30


def test_a_time_budget_pauses_and_the_same_command_continues(capsys, successor_file: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    from mlsa4rec.training.trainer import Trainer

    study = write_study(tmp_path, successor_file, seeds=[1])
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "out"
    assert main(["-q", "study", "run", str(study), "--time-budget", "1e-9"]) == EXIT_PAUSED  # spent before a cell
    assert "paused" in capsys.readouterr().err and not (root / "runs").exists()
    with monkeypatch.context() as m:  # the budget runs out in the first cell, after its first epoch
        m.setattr(Trainer, "out_of_time", lambda self: (self.progress.epoch, self.progress.step) == (2, 0))
        assert main(["-q", "study", "run", str(study)]) == EXIT_PAUSED
    assert [r["state"] for r in study_status(root)] == ["waiting", "waiting"]  # the paused cell queued at once
    trained = []
    real_run_cell = study_module.run_cell
    monkeypatch.setattr(study_module, "run_cell", lambda cell, *a: trained.append(cell.id) or real_run_cell(cell, *a))
    assert main(["-q", "study", "run", str(study)]) == 0
    assert trained == ["main/sasrec/succ/seed-1", "main/gru4rec/succ/seed-1"]  # the paused cell continues first
    assert [r["state"] for r in study_status(root)] == ["done", "done"]
    resumed = [json.loads((root / "runs" / c / "results.json").read_text())["resumed"]
               for c in ("main/sasrec/succ/seed-1", "main/gru4rec/succ/seed-1")]
    assert resumed == [True, False]


def test_whole_cells_pauses_a_cell_whose_pace_shows_it_cannot_finish_and_trains_the_next(
        capsys, successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    """--whole-cells (a machine whose disk does not outlive the slice): a cell whose pace shows it
    cannot finish pauses after that epoch and the worker trains the next one instead; once only
    cells too long are left it stops (75), and any later worker continues them."""
    study = write_study(tmp_path, successor_file, seeds=[1])
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "out"
    assert main(["-q", "study", "run", str(study), "--whole-cells"]) == 2
    assert "--whole-cells needs --time-budget" in capsys.readouterr().err and not root.exists()
    real_watch = study_module.Fit.watch

    def slow_sasrec(self, cell, remaining):  # sasrec's epochs take a day each; gru4rec's as they are
        hook = real_watch(self, cell, remaining)
        return (lambda row: hook({**row, "train_seconds": 86400.0})) if cell.entry.label == "sasrec" else hook

    monkeypatch.setattr(study_module.Fit, "watch", slow_sasrec)
    trained = []
    real_run_cell = study_module.run_cell
    monkeypatch.setattr(study_module, "run_cell", lambda cell, *a: trained.append(cell.id) or real_run_cell(cell, *a))
    assert main(["-q", "study", "run", str(study), "--whole-cells", "--time-budget", "3600"]) == EXIT_PAUSED
    assert "no waiting cell can finish" in capsys.readouterr().err
    assert trained == ["main/sasrec/succ/seed-1", "main/gru4rec/succ/seed-1"]
    assert [r["state"] for r in study_status(root)] == ["waiting", "done"]  # queued again, at its checkpoint
    stage = (root / "runs" / "main/sasrec/succ/seed-1").with_name(".seed-1.partial")
    assert (stage / "checkpoint.pt").is_file()
    assert "1 more epoch(s) at 86400 s each would not finish" in (stage / "train.log").read_text()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study)]) == 0  # without the option: continued from its checkpoint
    assert json.loads((root / "runs/main/sasrec/succ/seed-1/results.json").read_text())["resumed"]


def test_whole_cells_costs_a_cell_from_its_other_seeds_and_its_model_s_epochs(successor_file: Path,
                                                                              tmp_path: Path, monkeypatch) -> None:
    study = write_study(tmp_path, successor_file, seeds=[1, 2, 3],
                        models={"sasrec": {"set": {**SASREC, "epochs": 5, "stopping_step": 1}},
                                "gru4rec": {"set": TINY}})
    monkeypatch.chdir(tmp_path)
    loaded = load_study(study)
    cells = {c.id: c for c in loaded.cells}
    fit = study_module.Fit(loaded)
    sasrec_2 = cells["main/sasrec/succ/seed-2"]
    assert fit.expected_epochs(sasrec_2) is None and fit.watch(sasrec_2, 10.0) is None  # no record at all: it runs
    assert fit.expected_epochs(cells["main/gru4rec/succ/seed-2"]) == 2  # epochs 2, stopping_step 10: all of them
    assert main(["-q", "study", "run", str(study), "--no-wait", "--time-budget", "1e-9"]) == EXIT_PAUSED
    record = {"epochs_run": 3,
              "history": [{"epoch": e, "train_seconds": 100.0, "eval_seconds": 20.0} for e in (1, 2, 3)]}
    monkeypatch.setattr(study_module, "read_record", lambda path: (record, {}))
    seed_1 = cells["main/sasrec/succ/seed-1"]
    monkeypatch.setattr(study_module.Cell, "record_path", lambda self, root: root / "study.json" if self is seed_1
                        else root / "none")  # seed 1 alone has a record: it took 3 epochs, 360 s
    assert fit.expected_epochs(sasrec_2) == 3
    assert fit.expected_epochs(cells["main/sasrec/succ/seed-1"]) == 3
    monkeypatch.setattr(study_module.Cell, "record_path", lambda self, root: root / "study.json"
                        if self.entry.label == "gru4rec" else root / "none")  # only the other model recorded
    assert fit.expected_epochs(sasrec_2) == 3  # the median of its group's records: 3 (the same record, twice)
    monkeypatch.setattr(study_module.Cell, "record_path", lambda self, root: root / "study.json" if self is seed_1
                        else root / "none")
    assert fit.may_start(sasrec_2, 361.0) and not fit.may_start(sasrec_2, 359.0)
    assert fit.too_long == {"main/sasrec/succ/seed-2"}
    sasrec_3 = cells["main/sasrec/succ/seed-3"]
    hook = fit.watch(sasrec_3, 1000.0)  # 3 epochs expected: 2 more of 300 s fit in 1000 s; then 1 of 1150 s not
    assert hook({"epoch": 1, "train_seconds": 250.0, "eval_seconds": 50.0}) is None
    assert "1 more epoch(s) at 1150 s each" in hook({"epoch": 2, "train_seconds": 1900.0, "eval_seconds": 100.0})
    assert "main/sasrec/succ/seed-3" in fit.too_long
    monkeypatch.setattr(study_module, "read_record", lambda path: ({**record, "epochs_run": 5}, {}))
    hook = study_module.Fit(loaded).watch(sasrec_3, 450.0)  # 5 epochs expected, 100 s each, with one slowed by
    assert hook({"epoch": 1, "train_seconds": 100.0}) is None  # other work on the machine: the median pace (100 s,
    assert hook({"epoch": 2, "train_seconds": 100.0}) is None  # not the mean, 400 s) finishes the last 2 in time
    assert hook({"epoch": 3, "train_seconds": 1000.0}) is None
    assert "1 more epoch(s) at 550 s" in hook({"epoch": 4, "train_seconds": 1000.0})  # slow for good: paused


def test_whole_cells_expects_a_group_with_no_record_to_run_its_model_s_epochs_from_the_other_groups(
        successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    """A group repeating models at another setting (the L = 200 group of the reproduction study)
    has no record of its own at first: its cells expect the most epochs their model ran in the
    other groups, so the pace check can pause them instead of letting them run out the budget; once
    the group has records of other models, a model's own epochs elsewhere still come before them."""
    study = write_study(tmp_path, successor_file, seeds=[1],
                        models={"sasrec": {"set": {**SASREC, "epochs": 9, "stopping_step": 1}},
                                "gru4rec": {"set": {**TINY, "epochs": 9, "stopping_step": 1}}},
                        groups={"long": {"models": ["sasrec", "gru4rec"], "set": {"MAX_ITEM_LIST_LENGTH": 20}}})
    monkeypatch.chdir(tmp_path)
    loaded = load_study(study)
    cells = {c.id: c for c in loaded.cells}
    long_sasrec = cells["long/sasrec/succ/seed-1"]
    fit = study_module.Fit(loaded)
    assert fit.expected_epochs(long_sasrec) is None  # nothing recorded anywhere: it runs
    epochs = {"main/sasrec/succ/seed-1": 4, "main/gru4rec/succ/seed-1": 7, "long/gru4rec/succ/seed-1": 8}
    monkeypatch.setattr(study_module.Cell, "record_path", lambda self, root: root / self.id.replace("/", "-"))
    monkeypatch.setattr(study_module, "read_record", lambda path: (
        {"epochs_run": epochs[next(i for i in epochs if i.replace("/", "-") == Path(path).name)], "history": []}, {}))
    (loaded.directory).mkdir(exist_ok=True)
    (loaded.directory / "main-gru4rec-succ-seed-1").touch()  # another model recorded in another group: no help
    assert study_module.Fit(loaded).expected_epochs(long_sasrec) is None
    (loaded.directory / "main-sasrec-succ-seed-1").touch()  # its own model in the main group: 4 epochs
    fit = study_module.Fit(loaded)
    assert fit.expected_epochs(long_sasrec) == 4
    hook = fit.watch(long_sasrec, 100.0)  # 3 more epochs of 40 s do not fit in 100 s: paused after the first
    assert "3 more epoch(s) at 40 s each" in hook({"epoch": 1, "train_seconds": 40.0})
    (loaded.directory / "long-gru4rec-succ-seed-1").touch()  # its group now has a record of another model:
    assert study_module.Fit(loaded).expected_epochs(long_sasrec) == 4  # its own model's 4 epochs still come first
    (loaded.directory / "main-sasrec-succ-seed-1").unlink()  # without them, the median of its group's records
    assert study_module.Fit(loaded).expected_epochs(long_sasrec) == 8


def epochs_only_records(tmp_path: Path, monkeypatch, name, epochs: dict[str, int]) -> Path:
    """A folder of stand-in records that say only how many epochs each cell ran: the cell named
    ``name(cell)`` counts as recorded, with ``epochs[name]`` epochs, once its file is touched there."""
    fake = tmp_path / "fake-records"
    fake.mkdir()
    monkeypatch.setattr(study_module.Cell, "record_path", lambda self, root: fake / name(self))
    monkeypatch.setattr(study_module, "read_record",
                        lambda path: ({"epochs_run": epochs[Path(path).name], "history": []}, {}))
    return fake


def test_whole_cells_expects_a_group_with_no_record_to_run_its_model_s_epochs_on_its_own_dataset_first(
        successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    """Epochs differ far more across datasets than across groups: a cell of a group with no record
    expects what its model ran in the other groups on its own dataset, and only without such a record
    what its model ran on any dataset."""
    import shutil

    other = tmp_path / "other.txt"
    shutil.copy(successor_file, other)
    study = write_study(tmp_path, successor_file, seeds=[1], datasets=[str(successor_file), str(other)],
                        models={"sasrec": {"set": {**SASREC, "epochs": 9, "stopping_step": 1}}},
                        groups={"long": {"models": ["sasrec"], "set": {"MAX_ITEM_LIST_LENGTH": 20}}})
    monkeypatch.chdir(tmp_path)
    loaded = load_study(study)
    long_sasrec = next(c for c in loaded.cells if c.group == "long" and Path(c.dataset).stem == "succ")
    fake = epochs_only_records(tmp_path, monkeypatch, lambda c: f"{c.group}-{Path(c.dataset).stem}",
                               {"main-succ": 4, "main-other": 7})
    (fake / "main-other").touch()  # its model recorded on the other dataset only: that is all there is
    assert study_module.Fit(loaded).expected_epochs(long_sasrec) == 7
    (fake / "main-succ").touch()  # and on its own dataset: that, not the larger figure elsewhere
    assert study_module.Fit(loaded).expected_epochs(long_sasrec) == 4


def test_whole_cells_expects_a_cell_to_run_what_its_seeds_ran_on_its_own_dataset(
        successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    """Within one group too, a model's epochs on the cell's own dataset come before the larger figure
    it ran on another (SASRec: 23 epochs on Video Games, 44 on Beauty; expecting 44 paused its Video
    Games seed after one epoch in a slice its 23 would have fitted)."""
    import shutil

    other = tmp_path / "other.txt"
    shutil.copy(successor_file, other)
    study = write_study(tmp_path, successor_file, seeds=[1, 2], datasets=[str(successor_file), str(other)],
                        models={"sasrec": {"set": {**SASREC, "epochs": 50, "stopping_step": 1}}})
    monkeypatch.chdir(tmp_path)
    loaded = load_study(study)
    second = next(c for c in loaded.cells if c.seed == 2 and Path(c.dataset).stem == "other")
    fake = epochs_only_records(tmp_path, monkeypatch, lambda c: f"{Path(c.dataset).stem}-{c.seed}",
                               {"succ-1": 44, "other-1": 23})
    (fake / "succ-1").touch()  # its model entry recorded on the other dataset only: that is all there is
    fit = study_module.Fit(loaded)
    assert fit.expected_epochs(second) == 44
    assert "43 more epoch(s) at 30 s each" in fit.watch(second, 800.0)({"epoch": 1, "train_seconds": 30.0})
    (fake / "other-1").touch()  # and its own first seed on its dataset: those 23, not the 44 elsewhere
    fit = study_module.Fit(loaded)
    assert fit.expected_epochs(second) == 23
    hook = fit.watch(second, 800.0)  # 22 more epochs of 30 s fit in 800 s: it goes on
    assert hook({"epoch": 1, "train_seconds": 30.0}) is None


def test_whole_cells_guesses_a_cell_new_to_its_dataset_from_its_model_s_pace_elsewhere(
        successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    """A cell with no seed recorded on its dataset is costed from its model's pace on another
    dataset, scaled by how much slower the models recorded (or watched by this worker) on both run on
    its own; without such a model there is no guess and it runs."""
    import shutil

    other = tmp_path / "other.txt"
    shutil.copy(successor_file, other)
    study = write_study(tmp_path, successor_file, seeds=[1, 2], datasets=[str(successor_file), str(other)],
                        models={"sasrec": {"set": {**SASREC, "epochs": 5, "stopping_step": 1}},
                                "gru4rec": {"set": TINY}})
    monkeypatch.chdir(tmp_path)
    loaded = load_study(study)
    cells = {(c.entry.label, Path(c.dataset).stem): c for c in loaded.cells if c.seed == 2}  # seed 1 recorded
    fake = tmp_path / "fake-records"
    fake.mkdir()
    records: dict[Path, dict] = {}

    def record(label: str, dataset: str, pace: float, epochs: int) -> None:
        path = fake / f"{label}-{dataset}-1.npz"
        path.touch()
        records[path] = {"epochs_run": epochs, "history": [{"epoch": e, "train_seconds": pace * 0.9,
                                                             "eval_seconds": pace * 0.1} for e in range(epochs)]}

    monkeypatch.setattr(study_module.Cell, "record_path",
                        lambda self, root: fake / f"{self.entry.label}-{Path(self.dataset).stem}-{self.seed}.npz")
    monkeypatch.setattr(study_module, "read_record", lambda path: (records[Path(path)], {}))
    record("sasrec", "succ", 100.0, 3)
    record("gru4rec", "succ", 50.0, 2)
    gru_other = cells[("gru4rec", "other")]
    fit = study_module.Fit(loaded)
    assert fit.guessed_seconds(gru_other) is None and fit.may_start(gru_other, 1.0)  # no model ran on both
    hook = fit.watch(cells[("sasrec", "other")], 1e6)  # an epoch this worker watched there counts as recorded
    assert hook({"epoch": 1, "train_seconds": 180.0, "eval_seconds": 20.0}) is None
    assert fit.guessed_seconds(gru_other) == pytest.approx(200.0)
    record("sasrec", "other", 200.0, 3)  # sasrec is twice as slow there: gru4rec's 2 epochs of 50 s, doubled
    fit = study_module.Fit(loaded)
    assert fit.guessed_seconds(gru_other) == pytest.approx(200.0)
    assert fit.may_start(gru_other, 201.0) and not fit.may_start(gru_other, 199.0)
    assert fit.too_long == {gru_other.id}
    record("gru4rec", "other", 10.0, 2)  # once a seed ran there, its own seconds decide (20 s), not a guess
    fit = study_module.Fit(loaded)
    assert fit.may_start(gru_other, 21.0) and not fit.may_start(gru_other, 19.0)
    sasrec_other = cells[("sasrec", "other")]
    del records[fake / "sasrec-other-1.npz"]
    (fake / "sasrec-other-1.npz").unlink()
    fit = study_module.Fit(loaded)  # scaled from succ by the median of gru4rec's 0.2 alone: 3 epochs of 20 s
    assert fit.guessed_seconds(sasrec_other) == pytest.approx(60.0)
    fit.watch(sasrec_other, 1e6)({"epoch": 1, "train_seconds": 180.0, "eval_seconds": 20.0})
    assert fit.guessed_seconds(sasrec_other) == pytest.approx(600.0)  # its own watched 200 s there, 3 epochs
    assert not fit.may_start(sasrec_other, 599.0) and fit.too_long == {sasrec_other.id}


def test_finished_runs_are_adopted_as_cells_and_not_trained_again(successor_file: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    study = write_study(tmp_path, successor_file, seeds=[1], models={"sasrec": {"set": SASREC}})
    made = tmp_path / "made-before"
    train("sasrec", str(successor_file), made, overrides={**SASREC, "seed": 1})
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study), "--adopt", str(made)]) == 0
    root = tmp_path / "out"
    assert not (root / "runs").exists()
    assert read_record(root / "records" / "main" / "sasrec" / "succ" / "seed-1.npz")[0]["run"] == str(made.resolve())
    other = tmp_path / "other-seed"
    train("sasrec", str(successor_file), other, overrides={**SASREC, "seed": 7})
    assert main(["-q", "study", "run", str(study), "--adopt", str(other)]) == 2


def test_another_study_s_record_is_adopted_as_the_cell_it_is_and_checked_against_the_data(
        capsys, successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    """A study that shares cells with another (the ablations' full model is the reproduction's)
    takes its records, on a new machine too (the run directories are gone): nothing is trained
    again; a record of no cell here, or made on other data, is refused before anything is written."""
    from conftest import successor_sequences, write_user_lines

    first = write_study(tmp_path, successor_file, seeds=[1], models={"sasrec": {"set": SASREC}}, baseline=None)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(first)]) == 0
    record = tmp_path / "out/records/main/sasrec/succ/seed-1.npz"
    shutil.rmtree(tmp_path / "out/runs")  # a fresh clone: records only
    spec = {"study": "second", "directory": "second", "datasets": [str(successor_file)], "seeds": [1],
            "baseline": "full", "models": {"full": {"model": "sasrec", "set": SASREC},
                                           "small": {"model": "gru4rec", "set": TINY}}}
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump(spec, sort_keys=False))
    missing, junk = tmp_path / "gru.npz", tmp_path / "junk.npz"
    junk.write_bytes(b"not a record")
    assert main(["-q", "study", "run", str(second), "--adopt", str(missing)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["-q", "study", "run", str(second), "--adopt", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "not a study record that can be adopted" in err and "delete" not in err  # not this study's to delete
    assert junk.read_bytes() == b"not a record" and not (tmp_path / "second").exists()
    trained = []
    real_run_cell = study_module.run_cell
    monkeypatch.setattr(study_module, "run_cell", lambda cell, *a: trained.append(cell.id) or real_run_cell(cell, *a))
    assert main(["-q", "study", "run", str(second), "--adopt", str(record)]) == 0
    assert trained == ["main/small/succ/seed-1"]
    meta, arrays = read_record(tmp_path / "second/records/main/full/succ/seed-1.npz")
    original, original_arrays = read_record(record)
    assert (meta["cell"], meta["model"], meta["adopted_from"]["cell"]) == ("main/full/succ/seed-1", "full",
                                                                            "main/sasrec/succ/seed-1")
    assert meta["test"] == original["test"] and all((arrays[k] == original_arrays[k]).all() for k in arrays)
    assert main(["-q", "study", "report", str(tmp_path / "second"), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report/report.json").read_text())
    assert {r["model"] for t in report["tables"] for r in t["rows"]} == {"full", "small"}
    third = tmp_path / "third.yaml"  # the full model only, at another learning rate: no cell is the record's
    third.write_text(yaml.safe_dump({**spec, "study": "third", "directory": "third", "baseline": None, "models": {
        "full": {"model": "sasrec", "set": {**SASREC, "learning_rate": 0.5}}}}, sort_keys=False))
    assert main(["-q", "study", "run", str(third), "--adopt", str(record)]) == 2
    assert "is no cell of study 'third'" in capsys.readouterr().err and not (tmp_path / "third").exists()
    write_user_lines(successor_file, successor_sequences(300, 30, seed=2))  # the file changed since
    (tmp_path / "second/records/main/full/succ/seed-1.npz").unlink()
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "second").rglob("*") if p.name != "study.db")
    assert main(["-q", "study", "run", str(second), "--adopt", str(record)]) == 2
    assert "was made on other data" in capsys.readouterr().err
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "second").rglob("*") if p.name != "study.db") == before


@pytest.mark.parametrize(("change", "message"), [
    ({"models": {"sasrec": {"model": "sasrek"}}}, "unknown model 'sasrek'"),
    ({"models": {"sasrec": {"config": ["no-such-preset"]}}}, "no-such-preset"),
    ({"models": {"sasrec": {"set": {"hidden_sise": 8}}}}, "unknown config key 'hidden_sise'"),
    ({"models": {"sasrec": {"set": {"hidden_size": 9, "n_heads": 2}}}}, "cell main/sasrec/.*divisible"),
    ({"datasets": ["no-such-dataset"]}, "unknown dataset"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"baseline": "bert4rec"}, "baseline 'bert4rec' is not one of the models"),
    ({"groups": {"long": {"models": ["lru"]}}}, "group 'long' names model 'lru'"),
    ({"baseline": ["sasrec"]}, "baseline \\['sasrec'\\] is not one of the models"),
])
def test_a_bad_study_file_is_one_error_line_before_anything(capsys, successor_file: Path, tmp_path: Path, change,
                                                           message: str, monkeypatch) -> None:
    study = write_study(tmp_path, successor_file, **change)
    monkeypatch.chdir(tmp_path)
    assert main(["study", "run", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_model_takes_settings_per_dataset(successor_file: Path, tmp_path: Path) -> None:
    """by_dataset adds config files and settings for one dataset, after the model's own and before
    the group's: one label, one row of the report, each dataset at its own recipe."""
    other = tmp_path / "other.txt"
    other.write_text(successor_file.read_text())
    (tmp_path / "lr.yaml").write_text("learning_rate: 0.005\n")
    study = write_study(tmp_path, successor_file, datasets=[str(successor_file), "other.txt"], seeds=[1],
                        models={"sasrec": {"set": SASREC, "by_dataset": {
                            "other.txt": {"config": "lr.yaml", "set": {"hidden_dropout_prob": 0.3}}}}},
                        groups={"short": {"set": {"epochs": 1}}})
    loaded = load_study(study)
    by = {(c.group, Path(c.dataset).name): cell_config(c, loaded) for c in loaded.cells}
    main_succ, main_other, short_other = by["main", "succ.txt"], by["main", "other.txt"], by["short", "other.txt"]
    assert (main_succ.train.learning_rate, main_succ.hyper.hidden_dropout_prob) == (0.001, 0.5)
    assert (main_other.train.learning_rate, main_other.hyper.hidden_dropout_prob) == (0.005, 0.3)
    assert (short_other.train.learning_rate, short_other.train.epochs, short_other.hyper.n_layers) == (0.005, 1, 1)


def test_a_model_can_be_limited_to_some_datasets_and_seeds(successor_file: Path, tmp_path: Path) -> None:
    """Three seeds for the models compared closely, one for the rest, in one table."""
    other = tmp_path / "other.txt"
    other.write_text(successor_file.read_text())
    study = write_study(tmp_path, successor_file, datasets=["succ.txt", "other.txt"], seeds=[1, 2, 3],
                        models={"sasrec": {"set": SASREC}, "gru4rec": {"set": TINY, "seeds": [1]},
                                "narm": {"model": "gru4rec", "set": TINY, "datasets": ["other.txt"], "seeds": [2, 9]}},
                        groups={"late": {"seeds": [2, 3]}})
    ids = {c.id for c in load_study(study, check=False).cells}
    assert ids == ({f"main/sasrec/{d}/seed-{s}" for d in ("succ", "other") for s in (1, 2, 3)}
                   | {"main/gru4rec/succ/seed-1", "main/gru4rec/other/seed-1", "main/narm/other/seed-2"}
                   | {f"late/sasrec/{d}/seed-{s}" for d in ("succ", "other") for s in (2, 3)}
                   | {"late/narm/other/seed-2"})
    lonely = write_study(tmp_path, successor_file, models={"sasrec": {"set": SASREC, "seeds": [7]}})
    with pytest.raises(MLSA4RecError, match="model 'sasrec' has no cell"):
        load_study(lonely, check=False)


@pytest.mark.parametrize(("by_dataset", "message"), [
    ({"ml-1m": {"set": {"epochs": 1}}}, "by_dataset names 'ml-1m', which no group of the study trains on"),
    ({"succ.txt": {"sett": {}}}, "unknown key 'sett' in model 'sasrec': by_dataset: succ.txt"),
    ({"succ.txt": {"config": [3]}}, "by_dataset: succ.txt: config must be a preset name"),
    ({"succ.txt": {"set": {"hidden_sise": 8}}}, "unknown config key 'hidden_sise'"),
])
def test_bad_per_dataset_settings_are_one_error_line(capsys, successor_file: Path, tmp_path: Path, monkeypatch,
                                                     by_dataset: dict, message: str) -> None:
    study = write_study(tmp_path, successor_file, datasets=["succ.txt"],
                        models={"sasrec": {"set": SASREC, "by_dataset": by_dataset}})
    monkeypatch.chdir(tmp_path)
    assert main(["study", "run", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_missing_study_file_is_named_as_a_study_file(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["study", "run", "sasrec-ml-1m"]) == 2  # a packaged preset's name is not a study
    assert capsys.readouterr().err == ("error: study file 'sasrec-ml-1m' does not exist; check the path "
                                       "(mlsa4rec study run FILE)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_storage_that_cannot_be_opened_and_a_directory_of_another_study_are_refused(
        capsys, successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    study = write_study(tmp_path, successor_file, seeds=[1], models={"gru4rec": {"set": TINY}}, baseline=None)
    monkeypatch.chdir(tmp_path)
    assert main(["study", "run", str(study), "--storage", "sqlite:////no/such/dir/x.db"]) == 2
    assert "cannot be opened" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["-q", "study", "run", str(study)]) == 0
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*"))
    other = write_study(tmp_path, successor_file, study="another", seeds=[1], models={"gru4rec": {"set": TINY}},
                        baseline=None)
    assert main(["study", "run", str(other)]) == 2
    assert "holds the study 'tiny', not 'another'" in capsys.readouterr().err
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*")) == before


def test_a_committed_study_directory_on_a_new_machine_shows_its_records_without_a_storage(
        capsys, successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    """A clone has the records and study.json but not the SQLite file (it is not committed): status
    lists the finished cells and makes no storage; an explicit storage without the study is refused."""
    study = write_study(tmp_path, successor_file, seeds=[1, 2], models={"gru4rec": {"set": {**TINY, "epochs": 1}}},
                        baseline=None)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study), "--time-budget", "1e-9"]) == EXIT_PAUSED
    assert main(["-q", "study", "run", str(study), "--no-wait"]) == 0
    root = tmp_path / "out"
    (root / "records/main/gru4rec/succ/seed-2.npz").unlink()
    (root / "study.db").unlink()
    assert main(["study", "status", str(root)]) == 0
    out = capsys.readouterr().out
    assert "1 done, 1 waiting" in out and not (root / "study.db").exists()
    assert main(["study", "status", str(root), "--storage", f"sqlite:///{tmp_path / 'other.db'}"]) == 2
    assert "holds no study 'tiny'" in capsys.readouterr().err


def test_a_study_file_edited_after_cells_finished_is_refused_not_reported(capsys, successor_file: Path,
                                                                          tmp_path: Path, monkeypatch) -> None:
    tiny = {**TINY, "epochs": 1}
    study = write_study(tmp_path, successor_file, seeds=[1], models={"gru4rec": {"set": tiny}}, baseline=None)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study)]) == 0
    write_study(tmp_path, successor_file, seeds=[1], models={"gru4rec": {"set": {**tiny, "epochs": 5}}}, baseline=None)
    root = tmp_path / "out"
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*") if p.name != "study.db")
    assert main(["study", "run", str(study)]) == 2
    err = capsys.readouterr().err
    assert "cell main/gru4rec/succ/seed-1 finished with other settings than the study file now gives (epochs)" in err
    assert [r["state"] for r in study_status(root)] == ["stale"]
    assert main(["study", "report", str(root)]) == 2 and "other settings" in capsys.readouterr().err
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*") if p.name != "study.db") == before


def test_a_failing_cell_is_named_and_the_others_still_train(capsys, successor_file: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    study = write_study(tmp_path, successor_file, seeds=[1], baseline=None,
                        models={"gru4rec": {"set": TINY}, "sasrec": {"set": {**SASREC, "learning_rate": 1e30}}})
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study)]) == 2
    err = capsys.readouterr().err
    assert "1 cell(s) failed, main/sasrec/succ/seed-1 first" in err and "Traceback" not in err
    assert [r["state"] for r in study_status(tmp_path / "out")] == ["done", "failed"]


def test_machines_sharing_a_storage_never_train_a_cell_twice(successor_file: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    study = write_study(tmp_path, successor_file, seeds=[1], models={"gru4rec": {"set": TINY}}, baseline=None)
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study), "--dir", "machine-a", "--storage", shared]) == 0
    assert main(["-q", "study", "run", str(study), "--dir", "machine-b", "--storage", shared]) == 0
    assert not (tmp_path / "machine-b" / "runs").exists()
    assert [r["state"] for r in study_status(tmp_path / "machine-b")] == ["done elsewhere"]


def test_damaged_records_other_heartbeats_and_unknown_storages_are_one_error_line(capsys, successor_file: Path,
                                                                                  tmp_path: Path, monkeypatch) -> None:
    study = write_study(tmp_path, successor_file, seeds=[1], models={"gru4rec": {"set": TINY}}, baseline=None)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study)]) == 0
    root = tmp_path / "out"
    assert main(["study", "run", str(study), "--heartbeat", "7"]) == 2
    assert "use --heartbeat 60, not 7" in capsys.readouterr().err
    assert main(["study", "status", str(root), "--storage", f"sqlite:///{tmp_path / 'empty.db'}"]) == 2
    assert "holds no study 'tiny'" in capsys.readouterr().err
    assert main(["study", "report", str(root), "--out", str(study)]) == 2
    assert "is a file" in capsys.readouterr().err
    record = root / "records" / "main" / "gru4rec" / "succ" / "seed-1.npz"
    record.write_bytes(record.read_bytes()[:100])
    for command in (["study", "status", str(root)], ["study", "report", str(root)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: study record") and err.count("\n") == 1
        assert f"restore it (git checkout -- {record}" in err  # before deleting: a committed record outlives its run


def test_the_longest_history_quarter_needs_every_record_to_carry_lengths() -> None:
    from mlsa4rec.experiments.report import _longest

    lengths = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=np.uint16)
    with_lengths = ({}, {"history_lengths": lengths})
    mask, shortest = _longest({"a": [with_lengths], "b": [with_lengths]})
    assert mask.tolist() == [False] * 5 + [True] * 3 and shortest == 6  # ties at the quantile are in
    assert _longest({"a": [with_lengths], "b": [({}, {})]}) is None  # a record made before lengths were kept
    with pytest.raises(MLSA4RecError, match="disagree on the users' history lengths"):
        _longest({"a": [with_lengths], "b": [({}, {"history_lengths": lengths[::-1]})]})


def test_the_models_in_focus_are_also_compared_with_the_best_of_the_others(successor_file: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    models = {"sasrec": {"set": SASREC}, "gru4rec": {"set": TINY},
              "weak": {"model": "gru4rec", "set": {**TINY, "epochs": 1, "learning_rate": 1e-5}},
              "bert4rec": {"set": {**TINY, "n_heads": 1, "inner_size": 16, "n_layers": 1}}}
    study = write_study(tmp_path, successor_file, seeds=[1], models=models, baseline="bert4rec", focus=["sasrec"])
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study)]) == 0
    (table,) = build_report(tmp_path / "out")["tables"]
    ndcg = {r["model"]: r["metrics"]["ndcg@10"][0] for r in table["rows"]}
    best = max(("gru4rec", "weak"), key=ndcg.get)  # neither the focus nor the baseline
    assert table["best_other"] == best
    assert [(c["model"], c["metric"]) for c in table["against_best_other"]] == [
        ("sasrec", m) for m in ("hit@10", "ndcg@10", "mrr@10")]
    assert table["against_best_other"][1]["baseline"] == pytest.approx(ndcg[best])
    assert main(["study", "report", str(tmp_path / "out"), "--no-plots"]) == 0
    assert f"against the strongest of the others, `{best}`" in (tmp_path / "out" / "report" / "report.md").read_text()


@pytest.mark.parametrize(("focus", "message"), [(["nope"], "focus names 'nope'"),
                                                (["sasrec"], "cannot also be in focus")])
def test_a_bad_focus_is_refused(successor_file: Path, tmp_path: Path, focus: list, message: str) -> None:
    with pytest.raises(MLSA4RecError, match=message):
        load_study(write_study(tmp_path, successor_file, focus=focus), check=False)


def test_the_committed_small_studys_report_is_rebuilt_from_its_records_alone() -> None:
    """studies/beauty-quick commits records, not runs: its report's tables come back the same from
    them on any machine (a record that changed, or a change to the report's arithmetic, shows here)."""
    root = Path(__file__).resolve().parents[2] / "studies" / "beauty-quick"
    committed = json.loads((root / "report" / "report.json").read_text())
    rebuilt = json.loads(json.dumps(build_report(root, n_resamples=10_000)))
    assert rebuilt["tables"] == committed["tables"] and not rebuilt["missing"]
    cells = {c["cell"] for c in rebuilt["cells"]}
    assert cells == {c["cell"] for c in committed["cells"]} and len(cells) == 6


def test_a_claim_is_set_beside_what_was_measured_and_each_cell_command_reruns_it(capsys, successor_file: Path,
                                                                                 tmp_path: Path, monkeypatch) -> None:
    """The study file's claim, caveats and deliberate omissions reach the report: every claimed change
    is paired and Holm-adjusted over the claim's own tests, given a verdict and one sentence per model;
    the report's command for a cell trains exactly that cell."""
    import shlex

    from mlsa4rec.experiments.report import claim_verdict

    (tmp_path / "other.txt").write_text(successor_file.read_text())
    claim = {"source": "A paper (2024)", "models": ["gru4rec"], "percent": {"hit@10": [4.5, 10.8], "mrr@10": [1, 2]}}
    study = write_study(tmp_path, successor_file, datasets=["succ.txt", "other.txt"],
                        models={"sasrec": {"set": SASREC}, "gru4rec": {"set": TINY, "datasets": ["succ.txt"]}},
                        claim=claim, notes=["Same-second events keep the file's order."],
                        not_run=[{"models": ["gru4rec"], "datasets": ["other"], "reason": "costs 3 h an epoch"}])
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study)]) == 0
    assert main(["study", "report", "out", "--no-plots"]) == 0
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    part = report["claim"]
    assert (part["baseline"], part["datasets"], part["missing"]) == (
        "sasrec", ["other", "succ"], [{"model": "gru4rec", "dataset": "other", "why": "not run"}])
    rows = part["rows"]
    assert [(r["dataset"], r["metric"], r["seeds"]) for r in rows] == [("succ", "hit@10", [1, 2]),
                                                                         ("succ", "mrr@10", [1, 2])]
    table = report["tables"][0]
    assert table["dataset"] == "succ"
    low, high = sorted(r["p_value"] for r in rows)
    holm = {low: min(1.0, 2 * low), high: max(min(1.0, 2 * low), high)}  # Holm over the claim's two tests alone
    for row in rows:  # the same pairing as the table's
        same = next(c for c in table["comparisons"] if c["model"] == "gru4rec" and c["metric"] == row["metric"])
        assert (row["relative"], row["p_value"]) == (same["relative"], same["p_value"])
        assert row["p_holm"] == pytest.approx(holm[row["p_value"]])
        assert row["verdict"] == claim_verdict(row["relative"], row["p_holm"], row["claimed_percent"][0])
    (summary,) = part["summary"]
    assert summary["verdict"] in ("reproduced", "partly reproduced", "not reproduced")
    assert summary["verdict"] in summary["sentence"] and "where measured (not run on other)" in summary["sentence"]
    text = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "## The claim" in text and "hit@10 +4.5% to +10.8%" in text and summary["sentence"] in text
    assert "- Same-second events keep the file's order." in text
    assert "- gru4rec on other: costs 3 h an epoch" in text
    # a cell's command, its run directory swapped for a new one, trains the same model to the same ranks
    cell = next(c for c in report["cells"] if c["cell"] == "main/gru4rec/succ/seed-2")
    args = shlex.split(cell["command"])
    assert args[:2] == ["mlsa4rec", "train"] and args[args.index("--output-dir") + 1] == cell["run"]
    args[args.index("--output-dir") + 1] = "again"
    assert main(["-q", *args[1:]]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["test"] == json.loads((tmp_path / cell["run"] / "results.json").read_text())["test"]


@pytest.mark.parametrize(("verdict", "relative", "p_holm"), [
    ("reproduced", 0.05, 0.01), ("reproduced", 0.20, 0.01), ("partly: a smaller significant gain", 0.02, 0.01),
    ("not reproduced: no significant difference", 0.08, 0.2), ("not reproduced: significantly worse", -0.05, 0.001),
    ("not reproduced: undefined (the baseline scores 0)", None, 1.0)])
def test_a_claim_verdict_needs_a_significant_gain_of_at_least_the_claimed_low_end(verdict, relative,
                                                                                  p_holm) -> None:
    from mlsa4rec.experiments.report import claim_verdict

    assert claim_verdict(relative, p_holm, 4.5) == verdict


@pytest.mark.parametrize(("change", "message"), [
    ({"claim": {"models": ["gru4rec"], "percent": {"hit@10": [1, 2]}}}, "claim needs source"),
    ({"claim": {"source": "x", "models": ["lru"], "percent": {"hit@10": [1, 2]}}}, "claim: models names 'lru'"),
    ({"claim": {"source": "x", "models": ["sasrec"], "percent": {"hit@10": [1, 2]}}}, "not one of the claim's own"),
    ({"claim": {"source": "x", "models": ["gru4rec"], "percent": {"hit@5": [1, 2]}}}, "unknown key 'hit@5'"),
    ({"claim": {"source": "x", "models": ["gru4rec"], "percent": {"hit@10": [3, 2]}}}, "low <= high"),
    ({"claim": {"source": "x", "models": ["gru4rec"], "percent": {"hit@10": [1, ".nan"]}}}, "low <= high"),
    ({"claim": {"source": "x", "models": ["gru4rec"], "percent": {}}}, "names no metric"),
    ({"claim": {"source": "x", "models": ["gru4rec"], "datasets": ["ml-1m"], "percent": {"hit@10": [1, 2]}}},
     "dataset 'ml-1m' is not one of the study's main grid"),
    ({"claim": "big gains"}, "claim must be a mapping"),
    ({"claim": {"source": "x", "models": ["gru4rec"], "baseline": ["sasrec"], "percent": {"hit@10": [1, 2]}}},
     "must be one of the models"),
    ({"claim": {"source": ["x"], "models": ["gru4rec"], "percent": {"hit@10": [1, 2]}}}, "source must be non-empty"),
    ({"claim": {"source": "x", "models": ["gru4rec"], "percent": [1, 2]}}, "claim: percent must be a mapping"),
    ({"not_run": "ml-1m"}, "not_run entry 1 must be a mapping"),
    ({"notes": [""]}, "notes must be non-empty text"),
    ({"notes": [3]}, "notes must be a non-empty list of strs"),
    ({"not_run": [{"models": ["gru4rec"], "datasets": ["succ"], "reason": "slow"}]}, "which the study trains"),
    ({"not_run": [{"models": ["gru4rec"], "datasets": ["x"]}]}, "needs models:, datasets: and reason:"),
    ({"not_run": [{"models": ["gru4rec"], "datasets": ["x"], "reason": "r", "cost": 3}]}, "unknown key 'cost'"),
])
def test_a_bad_claim_note_or_omission_is_refused(successor_file: Path, tmp_path: Path, change, message) -> None:
    with pytest.raises(MLSA4RecError, match=message):
        load_study(write_study(tmp_path, successor_file, **change), check=False)


def test_cells_are_trained_seed_by_seed_whatever_order_their_trials_were_queued_in(successor_file: Path,
                                                                                   tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """Every model's first seed before any second seed (a study stopped part-way compares every
    model), also when the storage's trials were queued in another order (a study begun by older code)."""
    import optuna

    from mlsa4rec.experiments.study import open_directory, queue_order, storage_for

    study = write_study(tmp_path, successor_file, models={"sasrec": {"set": SASREC}, "gru4rec": {"set": TINY},
                                                          "lone": {"model": "gru4rec", "set": TINY, "seeds": [2]}})
    loaded = load_study(study)
    order = queue_order(loaded)
    expected = ["main/sasrec/succ/seed-1", "main/gru4rec/succ/seed-1", "main/lone/succ/seed-2",
                "main/sasrec/succ/seed-2", "main/gru4rec/succ/seed-2"]
    assert sorted(order, key=order.get) == expected
    url = open_directory(loaded, None)
    opt = optuna.create_study(study_name="tiny", storage=storage_for(url), direction="maximize")
    for cell in reversed(expected):  # queued backwards, as no order of ours would
        opt.enqueue_trial({}, user_attrs={"cell": cell})
    trained = []
    real_run_cell = study_module.run_cell
    monkeypatch.setattr(study_module, "run_cell", lambda cell, *a: trained.append(cell.id) or real_run_cell(cell, *a))
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study)]) == 0
    assert trained == expected
    assert [r["state"] for r in study_status(tmp_path / "out")] == ["done"] * 5
    assert sorted(t.user_attrs["cell"] for t in trials(tmp_path / "out")) == sorted(expected)  # each once


def test_a_cell_completed_on_another_machine_is_not_taken_ahead_of_the_queue(successor_file: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """A duplicate waiting trial of a cell another machine completed (its record is there, not here)
    is never swapped ahead of a cell still to train."""
    import optuna

    from mlsa4rec.experiments.study import open_directory, storage_for

    study = write_study(tmp_path, successor_file, seeds=[1])
    done_elsewhere, to_train = "main/sasrec/succ/seed-1", "main/gru4rec/succ/seed-1"
    url = open_directory(load_study(study), None)
    opt = optuna.create_study(study_name="tiny", storage=storage_for(url), direction="maximize")
    opt.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.1,
                                            user_attrs={"cell": done_elsewhere}))
    opt.enqueue_trial({}, user_attrs={"cell": to_train})
    opt.enqueue_trial({}, user_attrs={"cell": done_elsewhere})  # first in queue order, but done
    trained = []
    real_run_cell = study_module.run_cell
    monkeypatch.setattr(study_module, "run_cell", lambda cell, *a: trained.append(cell.id) or real_run_cell(cell, *a))
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "study", "run", str(study)]) == 0
    assert trained == [to_train]


def test_a_cell_resumed_on_other_code_names_each_commit_with_where_it_began() -> None:
    from mlsa4rec.experiments.report import _code, _commits

    seg = [{"git_commit": "aaa", "from_epoch": 1, "from_step": 0},
           {"git_commit": "aaa", "from_epoch": 5, "from_step": 0},
           {"git_commit": "bbb", "from_epoch": 9, "from_step": 3}]
    record = {"git_commit": "bbb", "segments": seg}
    assert _code(record) == "aaa from epoch 1, bbb from epoch 9 step 3" and _commits(record) == ["aaa", "bbb"]
    assert _code({"git_commit": "aaa", "segments": seg[:2]}) == "aaa"  # one commit throughout
    assert _code({"git_commit": None}) == "commit unknown" and _commits({"git_commit": None}) == []
    assert _commits({"git_commit": "ccc"}) == ["ccc"]  # a record from before sessions were recorded
    # resumed from a checkpoint written before sessions were recorded: its first epochs' code is not known
    assert _code({"git_commit": "bbb", "segments": seg[2:]}) == "commit unknown from epoch 1, bbb from epoch 9 step 3"


def test_a_claim_sentence_gives_each_dataset_its_own_sentence() -> None:
    from mlsa4rec.experiments.report import _claim_sentence

    rows = [{"dataset": d, "metric": "hit@10", "relative": rel, "p_holm": p, "verdict": v, "seeds": [1]}
            for d, rel, p, v in (("beauty", 0.08, 0.001, "reproduced"),
                                 ("games", -0.09, 0.0001, "not reproduced: significantly worse"))]
    s = _claim_sentence("m", "base", rows, [{"model": "m", "dataset": "ml-1m", "why": "not run"}])
    assert s["verdict"] == "partly reproduced"
    assert s["sentence"] == ("`m` against `base`: **partly reproduced** where measured (not run on ml-1m). "
                             "On beauty (1 shared seed): hit@10 +8.0% (p 0.001, reproduced). "
                             "On games (1 shared seed): hit@10 -9.0% (p 0.0001, not reproduced: significantly worse).")
