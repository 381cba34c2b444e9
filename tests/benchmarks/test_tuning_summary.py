"""benchmarks/tuning_summary.py: tunings side by side from their trials.json, budgets checked."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from mlsa4rec.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py from beside them
_spec = importlib.util.spec_from_file_location("tuning_summary", REPO / "benchmarks" / "tuning_summary.py")
ts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ts)


def tune(successor_file: Path, root: Path, model: str, trials: int) -> Path:
    space = root.parent / f"{model}-space.yaml"
    space.write_text(yaml.safe_dump({"learning_rate": {"type": "log", "low": 1e-3, "high": 3e-2}}))
    assert cli(["-q", "tune", "--model", model, "--dataset", str(successor_file), "--space", str(space), "--trials",
                str(trials), "--dir", str(root), "--seed", "1", "--set", "epochs=2", "--set", "hidden_size=8",
                "--set", "MAX_ITEM_LIST_LENGTH=8"]) == 0
    return root


def test_tunings_side_by_side_and_whether_their_budgets_are_equal(successor_file: Path, tmp_path: Path,
                                                                  capsys) -> None:
    a = tune(successor_file, tmp_path / "gru", "gru4rec", 3)
    b = tune(successor_file, tmp_path / "gru-more", "gru4rec", 4)
    ts.main([str(a), str(a), "--out", str(tmp_path / "page")])
    report = json.loads((tmp_path / "page.json").read_text())
    first = report["tunings"][0]
    trials = json.loads((a / "trials.json").read_text())
    assert (first["finished"], first["best_trial"], first["best_valid"]) == (3, trials["best"]["trial"],
                                                                           trials["best"]["value"])
    assert first["best_test"] == trials["best"]["test"] and "learning_rate" in first["best_params"]
    assert "the same number of trials" in (tmp_path / "page.md").read_text()
    ts.main([str(a), str(b)])
    assert "The budgets are not equal yet" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        ts.main([str(tmp_path / "nothing")])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: cannot read")
