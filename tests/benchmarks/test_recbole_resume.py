"""A stopped RecBole oracle run continues where it was, and ends where an uninterrupted one ends;
our side is taken from a finished run (``--ours-run``) only where it ran the same settings and data.

The bookkeeping (which saved state is kept, what a pause returns) is tested with a stand-in for
RecBole's interpreter; the end-to-end check needs RecBole's own venv (``recbole_parity.py setup``)
and is skipped, with that reason, where it is absent (CI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import successor_sequences, write_user_lines

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py from beside them
_spec = importlib.util.spec_from_file_location("recbole_parity", REPO / "benchmarks" / "recbole_parity.py")
rp = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("recbole_parity", rp)
_spec.loader.exec_module(rp)

SPEC = {"model": "SASRec", "dataset": "succ", "seed": 2020, "epochs": 4, "threads": 1,
        "data_path": "/here/data", "checkpoint_dir": "/here/saved"}


def test_resume_key_ignores_only_the_machine():
    moved = {**SPEC, "threads": 2, "data_path": "/there/data", "checkpoint_dir": "/there/saved"}
    assert rp.resume_key(moved) == rp.resume_key(SPEC)
    assert rp.resume_key({**SPEC, "epochs": 5}) != rp.resume_key(SPEC)
    assert rp.resume_key({**SPEC, "seed": 1}) != rp.resume_key(SPEC)


def _fake_interpreter(tmp_path: Path, body: str) -> Path:
    """An executable standing in for RecBole's python: ``$3`` is spec.json, ``$4`` result.json."""
    py = tmp_path / "fake-python"
    py.write_text("#!/bin/sh\nwork=$(dirname \"$3\")\n" + body)
    py.chmod(py.stat().st_mode | stat.S_IXUSR)
    return py


def _stopped_run(work: Path, spec: dict) -> None:
    work.mkdir(parents=True)
    (work / "spec.json").write_text(json.dumps(spec))
    (work / rp.RESUME_FILE).write_bytes(b"state")
    (work / rp.PROGRESS_FILE).write_text(json.dumps({"epoch": 2, "best_epoch": 2}))


# the stand-in reports whether the saved state was still there when it started, then finishes
_REPORTS_STATE = ('if [ -e "$work/resume.pt" ]; then s=true; else s=false; fi\n'
                  'echo "{\\"test\\": {}, \\"state_seen\\": $s}" > "$4"\n')


def test_a_stopped_run_of_the_same_settings_is_continued(tmp_path):
    work = tmp_path / "run"
    _stopped_run(work, {**SPEC, "threads": 2})          # another thread count: still the same run
    result = rp.run_recbole(_fake_interpreter(tmp_path, _REPORTS_STATE), SPEC, work)
    assert result["state_seen"] is True


@pytest.mark.parametrize("change, reuse", [({"epochs": 10}, True), ({}, False)])
def test_a_stopped_run_is_discarded_for_other_settings_or_rerun(tmp_path, change, reuse):
    work = tmp_path / "run"
    _stopped_run(work, {**SPEC, **change})
    result = rp.run_recbole(_fake_interpreter(tmp_path, _REPORTS_STATE), SPEC, work, reuse=reuse)
    assert result["state_seen"] is False
    assert not (work / rp.PROGRESS_FILE).exists()


def test_a_pause_raises_with_the_progress_and_passes_the_limits(tmp_path):
    body = ('echo "$@" > "$work/args"\n'
            'echo \'{"epoch": 3, "best_epoch": 2}\' > "$work/progress.json"\n'
            f"exit {rp.PAUSED_EXIT}\n")
    work = tmp_path / "run"
    with pytest.raises(rp.RecBolePaused) as paused:
        rp.run_recbole(_fake_interpreter(tmp_path, body), SPEC, work, time_budget=500.0, pause_after=3)
    assert paused.value.progress == {"epoch": 3, "best_epoch": 2}
    assert (work / "args").read_text().split()[-4:] == ["--time-budget", "500.0", "--pause-after", "3"]
    assert not (work / "result.json").exists()


def test_a_failed_worker_is_an_error_not_a_pause(tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        rp.run_recbole(_fake_interpreter(tmp_path, "exit 1\n"), SPEC, tmp_path / "run")


def test_limits_must_be_positive(capsys):
    with pytest.raises(SystemExit, match="--pause-after must be positive"):
        rp.main(["run", "--model", "sasrec", "--dataset", "x", "--pause-after", "0"])


# --- end to end, in RecBole's venv --------------------------------------------------------------
VENV_PYTHON = rp.venv_python(rp.DEFAULT_VENV)
needs_recbole = pytest.mark.skipif(
    not VENV_PYTHON.exists(),
    reason=f"RecBole's venv is absent ({rp.DEFAULT_VENV}); create it with `python benchmarks/recbole_parity.py setup`")

TINY = ["--set", "hidden_size=16", "--set", "inner_size=32", "--set", "n_layers=1", "--set", "n_heads=1",
        "--set", "MAX_ITEM_LIST_LENGTH=10", "--set", "epochs=4", "--set", "stopping_step=10",
        "--set", "train_batch_size=256", "--seeds", "2020", "--threads", "1", "--skip-ours"]


def _parity(data: Path, work: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "benchmarks" / "recbole_parity.py"), "run", "--model", "sasrec",
           "--dataset", str(data), *TINY, "--work-dir", str(work), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@needs_recbole
def test_a_paused_and_continued_run_equals_one_run_to_the_epoch(successor_file, tmp_path):
    whole = _parity(successor_file, tmp_path / "w1", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = _parity(successor_file, tmp_path / "w2", tmp_path / "parts", "--pause-after", "2")
    assert first.returncode == rp.PAUSED_EXIT, first.stderr[-3000:]
    assert "paused: RecBole sasrec, seed 2020, stopped after epoch 2" in first.stdout
    assert not (tmp_path / "parts.json").exists()          # no report until the run is finished
    second = _parity(successor_file, tmp_path / "w2", tmp_path / "parts")
    assert second.returncode == 0, second.stderr[-3000:]

    a = json.loads((tmp_path / "whole.json").read_text())["runs"][0]["recbole"]
    b = json.loads((tmp_path / "parts.json").read_text())["runs"][0]["recbole"]
    assert (a["resumed_at"], b["resumed_at"]) == ([], [3])
    assert b["parts"] == [{"first_epoch": 1, "threads": 1}, {"first_epoch": 3, "threads": 1}]
    assert len(a["history"]) == len(b["history"]) == 4
    for x, y in zip(a["history"], b["history"]):
        assert (x["epoch"], x["loss_sum"], x["valid"]) == (y["epoch"], y["loss_sum"], y["valid"])
    assert a["best_valid"] == b["best_valid"] and a["test"] == b["test"]
    assert not (tmp_path / "w2" / "recbole-sasrec-seed2020" / rp.RESUME_FILE).exists()  # finished: state gone


# --- our side from a finished run (--ours-run) -------------------------------------------------
TINY_SETS = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 10,
             "epochs": 2, "train_batch_size": 256, "seed": 7}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-epoch SASRec run of exactly the parity settings TINY_SETS, and its data file."""
    from mlsa4rec.training.run import train

    root = tmp_path_factory.mktemp("ours")
    data = write_user_lines(root / "succ.txt", successor_sequences(300, 30, seed=1))
    overrides = {**rp.PARITY_DEFAULTS, **TINY_SETS, **rp.forced("sasrec")}
    train("sasrec", str(data), root / "run", overrides=overrides, overwrite=True)
    return root / "run", data


def _recorded(run_dir: Path, data: Path, **change):
    config = rp.parity_config("sasrec", [], {**TINY_SETS, **change})
    return rp.recorded_ours(run_dir, "sasrec", config, rp._load(str(data), None, config))


def test_a_finished_run_of_the_same_settings_is_taken_as_is(finished_run):
    run_dir, data = finished_run
    results = json.loads((run_dir / "results.json").read_text())
    ours = _recorded(run_dir, data)
    assert ours["history"] == results["history"] and len(ours["history"]) == 2
    assert ours["test"] == results["test"] and ours["seed"] == 7
    assert ours["recorded_run"]["commit"] == results["git_commit"]


def test_a_run_of_other_settings_is_refused_by_name(finished_run):
    run_dir, data = finished_run
    with pytest.raises(SystemExit, match=r"ran other settings than this comparison: learning_rate=0.001 "
                                         r"\(parity: 0.002\)"):
        _recorded(run_dir, data, learning_rate=0.002)
    gru = rp.parity_config("gru4rec", [], {})
    with pytest.raises(SystemExit, match="trained 'sasrec', not 'gru4rec'"):
        rp.recorded_ours(run_dir, "gru4rec", gru, rp._load(str(data), None, gru))


def test_a_run_on_other_data_is_refused(finished_run, tmp_path):
    run_dir, _ = finished_run
    other = write_user_lines(tmp_path / "succ.txt", successor_sequences(300, 30, seed=2))
    with pytest.raises(SystemExit, match="trained on other data"):
        _recorded(run_dir, other)


def test_not_a_run_is_an_error(finished_run, tmp_path):
    with pytest.raises(SystemExit, match="holds no finished run"):
        _recorded(tmp_path, finished_run[1])


def test_reports_say_which_side_was_recorded_or_resumed():
    report = {"runs": [{"seed": 2020,
                        "recbole": {"history": [{}] * 37, "parts": [{"first_epoch": 1, "threads": None},
                                                                    {"first_epoch": 10, "threads": 2}]},
                        "ours": {"run_dir": "runs/x", "threads": 1,
                                 "recorded_run": {"commit": "0a78ef6abc", "started": "T", "resumed": True}}},
                       {"seed": 2021, "recbole": {"history": [{}] * 5, "parts": [{"first_epoch": 1, "threads": 2}]},
                        "ours": {"history": []}}]}
    notes = rp.provenance_notes(report)
    assert len(notes) == 2  # seed 2021 ran in one go on both sides: nothing to say
    assert notes[0].startswith("Seed 2020, ours: the finished run `runs/x` (commit `0a78ef6`, its last part")
    assert notes[1] == ("Seed 2020, RecBole: stopped and continued from its saved state (2 parts: epochs 1-9 on "
                        "an unrecorded number of threads, epochs 10-37 on 2 threads).")


def test_a_setting_the_run_predates_is_taken_at_its_default_and_named(finished_run, tmp_path):
    import shutil

    import yaml

    run_dir, data = finished_run
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["similarity"], config["temperature"]          # as a run made before SASRec's cosine head
    del config["attn_dropout_prob"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    ours = _recorded(old, data)
    assert ours["recorded_run"]["predates"] == {"similarity": "dot", "temperature": 1.0, "attn_dropout_prob": 0.5}
    with pytest.raises(SystemExit, match=r"attn_dropout_prob=None \(parity: 0.2\)"):
        _recorded(old, data, attn_dropout_prob=0.2)           # not the default: the run cannot have had it


def test_the_command_refuses_a_mismatched_run_before_recbole_starts(finished_run, tmp_path):
    run_dir, data = finished_run
    sets = [x for k, v in {**TINY_SETS, "learning_rate": 0.002}.items() for x in ("--set", f"{k}={v}")]
    no_venv = tmp_path / "no-venv"                         # RecBole would be set up here, after the check
    with pytest.raises(SystemExit, match="learning_rate=0.001 \\(parity: 0.002\\)"):
        rp.main(["run", "--model", "sasrec", "--dataset", str(data), *sets, "--ours-run", str(run_dir),
                 "--work-dir", str(tmp_path / "work"), "--venv", str(no_venv), "--out", str(tmp_path / "r")])
    assert not no_venv.exists() and not (tmp_path / "r.json").exists()
