"""benchmarks/history_rule.py: both rules from one run's saved weights, refused on a non-run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mlsa4rec.training.run import train

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py from beside them
_spec = importlib.util.spec_from_file_location("history_rule", REPO / "benchmarks" / "history_rule.py")
hr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hr)


def test_both_rules_of_a_finished_run(successor_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train("gru4rec", str(successor_file), run_dir, overrides={"epochs": 2, "embedding_size": 16, "hidden_size": 16,
                                                              "seed": 3})
    hr.main([str(run_dir), "--out", str(tmp_path / "report")])
    report = json.loads((tmp_path / "report.json").read_text())
    (row,) = report["runs"]
    assert (row["run"], row["model"], row["trained_with"]) == ("run", "gru4rec", "ranked")
    trained = json.loads((run_dir / "results.json").read_text())
    assert row["ranked"]["test"] == pytest.approx(trained["test"])  # the run's own rule, re-scored
    for split in ("valid", "test"):
        assert all(row["excluded"][split][m] >= row["ranked"][split][m] for m in row["ranked"][split])
    md = (tmp_path / "report.md").read_text()
    assert "| `run` | gru4rec |" in md and "hit@10 excluded" in md


def test_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a finished run directory"):
        hr.main([str(tmp_path), "--out", str(tmp_path / "report")])
    assert not (tmp_path / "report.json").exists()
