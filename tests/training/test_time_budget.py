"""A run in slices: ``--time-budget`` stops at a checkpoint (exit 75) and ``--resume`` continues it to
exactly the run that was never stopped; each epoch's row reaches ``on_epoch``."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from mlsa4rec.cli import EXIT_PAUSED, main
from mlsa4rec.errors import MLSA4RecError, TimeBudgetSpent
from mlsa4rec.training.run import train
from mlsa4rec.training.trainer import Trainer

SMALL = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "hidden_dropout_prob": 0.2,
         "attn_dropout_prob": 0.2, "MAX_ITEM_LIST_LENGTH": 8, "learning_rate": 0.01, "epochs": 3,
         "train_batch_size": 32, "stopping_step": 100, "seed": 11, "eval_batch_size": 64, "lr_scheduler": "cosine"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _same(a: dict, b: dict) -> None:
    assert a["valid"] == b["valid"] and a["test"] == b["test"] and a["epochs_run"] == b["epochs_run"]
    assert [(h["loss"], h["lr"], h.get("valid")) for h in a["history"]] == \
        [(h["loss"], h["lr"], h.get("valid")) for h in b["history"]]


def test_a_budget_spent_mid_epoch_pauses_and_resume_ends_as_the_unbroken_run(successor_file: Path,
                                                                            tmp_path: Path) -> None:
    whole = train("sasrec", str(successor_file), tmp_path / "whole", overrides=SMALL)
    with pytest.raises(TimeBudgetSpent, match="epoch 1, step 1.*--resume"):
        train("sasrec", str(successor_file), tmp_path / "sliced", overrides=SMALL, time_budget_s=1e-9)
    assert not (tmp_path / "sliced").exists() and (tmp_path / ".sliced.partial" / "checkpoint.pt").is_file()
    _same(train("sasrec", str(successor_file), tmp_path / "sliced", overrides=SMALL, resume=True), whole)


def test_a_budget_spent_at_an_epoch_end_pauses_after_its_checkpoint(successor_file: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    whole = train("sasrec", str(successor_file), tmp_path / "whole", overrides=SMALL)
    rows: list[dict] = []
    monkeypatch.setattr(Trainer, "out_of_time", lambda self: (self.progress.epoch, self.progress.step) == (2, 0))
    with pytest.raises(TimeBudgetSpent, match="after epoch 1"):
        train("sasrec", str(successor_file), tmp_path / "sliced", overrides=SMALL, on_epoch=rows.append)
    assert [r["epoch"] for r in rows] == [1] and "valid" in rows[0] and math.isfinite(rows[0]["lr"])
    monkeypatch.undo()
    _same(train("sasrec", str(successor_file), tmp_path / "sliced", overrides=SMALL, resume=True,
                on_epoch=rows.append), whole)
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_a_reason_from_on_epoch_pauses_there_unless_that_epoch_was_the_last(successor_file: Path,
                                                                           tmp_path: Path) -> None:
    """A hook that asks for a pause (a study's --whole-cells) pauses the run after its checkpoint;
    asked after the last epoch it changes nothing: the run is finished, not paused."""
    whole = train("sasrec", str(successor_file), tmp_path / "whole", overrides=SMALL)
    with pytest.raises(TimeBudgetSpent, match="too slow after epoch 2.*--resume"):
        train("sasrec", str(successor_file), tmp_path / "sliced", overrides=SMALL,
              on_epoch=lambda row: "too slow" if row["epoch"] == 2 else None)
    _same(train("sasrec", str(successor_file), tmp_path / "sliced", overrides=SMALL, resume=True), whole)
    asked = []
    last = train("sasrec", str(successor_file), tmp_path / "last", overrides=SMALL,
                 on_epoch=lambda row: asked.append(row["epoch"]) or "too slow" if row["epoch"] == 3 else None)
    assert asked == [3] and (tmp_path / "last" / "results.json").is_file()
    _same(last, whole)
    rows = []  # a callback that returns something else (here the row) pauses nothing, as before
    _same(train("sasrec", str(successor_file), tmp_path / "other", overrides=SMALL,
                on_epoch=lambda row: rows.append(row) or row), whole)
    assert len(rows) == 3


def test_cli_exits_75_with_the_resume_hint_and_the_same_command_continues(capsys, successor_file: Path,
                                                                        tmp_path: Path) -> None:
    command = ["train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir", str(tmp_path / "run"),
               "-q", *[a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]]
    assert main([*command, "--time-budget", "1e-9"]) == EXIT_PAUSED == 75
    err = capsys.readouterr().err
    assert err.startswith("paused: the time budget ran out") and "--resume" in err and "Traceback" not in err
    assert main([*command, "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs_run"] == 3


@pytest.mark.parametrize("budget", [0, -5, float("nan"), True])
def test_a_budget_that_is_not_a_positive_number_is_refused_before_anything(successor_file: Path, tmp_path: Path,
                                                                           budget: float) -> None:
    with pytest.raises(MLSA4RecError, match="time budget must be a positive number"):
        train("sasrec", str(successor_file), tmp_path / "run", overrides=SMALL, time_budget_s=budget)
    assert not any(tmp_path.glob("*run*"))


def test_each_session_of_a_resumed_run_names_the_code_that_trained_it(successor_file: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """A run paused on one commit and resumed on another records both, each with where it began;
    a process names the commit it started on, whatever HEAD becomes while it runs."""
    from mlsa4rec.training import run as run_module

    commits = iter(["aaa", "bbb"])
    monkeypatch.setattr(run_module, "git_commit", lambda: next(commits))
    monkeypatch.setattr(Trainer, "out_of_time", lambda self: (self.progress.epoch, self.progress.step) == (2, 0))
    with pytest.raises(TimeBudgetSpent):
        train("sasrec", str(successor_file), tmp_path / "run", overrides=SMALL)
    from mlsa4rec.runs import checkpoint

    meta = json.loads(checkpoint.load(tmp_path / ".run.partial" / "checkpoint.pt")["meta"])
    assert [s["git_commit"] for s in meta["segments"]] == ["aaa"]
    assert "segments" not in meta["progress"]  # older code reads it with Progress(**...): no key it lacks
    state = checkpoint.load(tmp_path / ".run.partial" / "checkpoint.pt")  # as commit 03de733 wrote them:
    state["meta"] = json.dumps({**meta, "progress": {**meta["progress"], "segments": meta.pop("segments")}})
    checkpoint.save(tmp_path / ".run.partial" / "checkpoint.pt", state)  # inside Progress, still read
    monkeypatch.undo()
    monkeypatch.setattr(run_module, "git_commit", lambda: next(commits))
    results = train("sasrec", str(successor_file), tmp_path / "run", overrides=SMALL, resume=True)
    assert results["git_commit"] == "bbb"
    assert [(s["git_commit"], s["from_epoch"], s["from_step"]) for s in results["segments"]] == \
        [("aaa", 1, 0), ("bbb", 2, 0)]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["segments"] == results["segments"]


def test_a_process_names_the_commit_it_started_on(monkeypatch) -> None:
    import subprocess

    from mlsa4rec.training import run as run_module

    heads = iter(["1" * 40, "", "2" * 40, ""])  # rev-parse, status; then HEAD moves
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, next(heads), ""))
    run_module.git_commit.cache_clear()
    try:
        assert run_module.git_commit() == "1" * 40 and run_module.git_commit() == "1" * 40
    finally:
        run_module.git_commit.cache_clear()


def test_sigterm_pauses_a_training_at_its_next_step_and_the_same_command_continues(successor_file: Path,
                                                                                   tmp_path: Path) -> None:
    """`kill PID` on a run in the background (where Ctrl-C is ignored) pauses it as a spent budget
    does: a checkpoint mid-epoch, exit 75; --resume ends it as the run never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    settings = {**SMALL, "epochs": 40}
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mlsa4rec", "-q", "train", "--model", "sasrec", "--dataset", str(successor_file),
               "--output-dir", str(out), *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log, deadline = tmp_path / ".run.partial" / "train.log", time.monotonic() + 300
        while not log.is_file() or "epoch   2" not in log.read_text():
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()[-2000:]
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == EXIT_PAUSED, err[-2000:]
    assert re.search(r"paused: SIGTERM received (at|after) epoch", err) and "--resume" in err and not out.exists()
    resumed = train("sasrec", str(successor_file), out, overrides=settings, resume=True)
    assert resumed["resumed"] and resumed["epochs_run"] == 40
    _same(resumed, train("sasrec", str(successor_file), tmp_path / "whole", overrides=settings))


def test_a_second_sigterm_is_the_default_again_and_the_handler_is_restored_after() -> None:
    import os
    import signal

    from mlsa4rec.training import stop

    before = signal.getsignal(signal.SIGTERM)
    with stop.pause_on_sigterm():
        assert not stop.requested() and stop.why_paused() == "the time budget ran out"
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not stop.requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested() and stop.why_paused() == "SIGTERM received"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second one ends the process
    assert signal.getsignal(signal.SIGTERM) == before and not stop.requested()


def test_a_ctrl_c_inside_sigint_deferred_takes_effect_when_the_block_ends() -> None:
    import signal

    from mlsa4rec.training import stop

    # Ctrl-C as a terminal gives it (a shell's background job, as CI may run us, starts with it ignored)
    outer, done = signal.signal(signal.SIGINT, signal.default_int_handler), []
    try:
        with pytest.raises(KeyboardInterrupt):
            with stop.sigint_deferred():
                signal.raise_signal(signal.SIGINT)  # a Ctrl-C here: the block goes on to its end
                done.append("the write")
        assert done == ["the write"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with stop.sigint_deferred():  # none: nothing raised, the handler restored
            pass
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.parametrize("where", ["SIGTERM ignored", "another thread"])
def test_an_error_inside_the_signal_blocks_is_that_error_where_nothing_is_installed(where: str) -> None:
    """Where no handler can be installed, the block's own error comes out (a ValueError was once
    taken for the set-up's and became 'generator didn't stop after throw()')."""
    import signal
    import threading

    from mlsa4rec.training import stop

    def run() -> list[str]:
        seen = []
        for block in (stop.pause_on_sigterm, stop.sigint_deferred):
            try:
                with block():
                    raise ValueError("the block's own error")
            except ValueError as exc:
                seen.append(str(exc))
        return seen

    if where == "another thread":
        out: list[list[str]] = []
        thread = threading.Thread(target=lambda: out.append(run()))
        thread.start()
        thread.join()
        assert out == [["the block's own error"] * 2]
        return
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert run() == ["the block's own error"] * 2
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # still ignored
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


TRAIN = ["-q", "train", "--model", "sasrec", "--dataset", "x", "--output-dir", "y"]


@pytest.mark.parametrize("argv, launched, ignored, pauses", [
    (TRAIN, False, False, True), ([*TRAIN, "--nproc", "2"], False, False, False), (TRAIN, True, False, False),
    (TRAIN, False, True, False),  # ignored by whoever started the process: it stays ignored
    (["-q", "study", "run", "s.yaml"], False, False, True), (["-q", "study", "status", "d"], False, False, False),
])
def test_only_a_single_training_process_pauses_on_sigterm(monkeypatch, argv, launched: bool, ignored: bool,
                                                            pauses: bool) -> None:
    """torchrun's agent stops its workers with SIGTERM itself (and --nproc launches one): there the
    signal keeps its default, so that no worker outlives its agent; a status or report ends on it."""
    import signal

    from mlsa4rec import cli

    if launched:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
    else:
        monkeypatch.delenv("RANK", raising=False)
    seen = []
    for command in ("train", "study"):
        monkeypatch.setitem(cli.COMMANDS, command, lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN if ignored else signal.SIG_DFL)
    try:
        assert main(argv) == 0
        assert (seen[0] not in (signal.SIG_DFL, signal.SIG_IGN, None)) == pauses
        assert signal.getsignal(signal.SIGTERM) == (signal.SIG_IGN if ignored else signal.SIG_DFL)  # restored
    finally:
        signal.signal(signal.SIGTERM, before)
