"""benchmarks/long_sequences.py: cost against L from an isolated epoch_time JSON, accuracy from the
long-sequence study's records."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlsa4rec.cli import main as cli
from mlsa4rec.experiments.report import build_report

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py from beside them
_spec = importlib.util.spec_from_file_location("long_sequences", REPO / "benchmarks" / "long_sequences.py")
ls = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ls)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cost_and_accuracy_against_length(successor_file: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    study = tmp_path / "long.yaml"
    study.write_text(f"""
study: long
datasets: [{successor_file}]
seeds: [1]
models:
  sasrec: {{set: {{hidden_size: 8, n_heads: 1, inner_size: 16, n_layers: 1, epochs: 1, MAX_ITEM_LIST_LENGTH: 8}}}}
  mamba4rec: {{set: {{hidden_size: 8, epochs: 1, MAX_ITEM_LIST_LENGTH: 8}}}}
groups:
  L16: {{set: {{MAX_ITEM_LIST_LENGTH: 16}}}}
""")
    monkeypatch.chdir(tmp_path)
    assert cli(["-q", "study", "run", str(study)]) == 0
    timing = tmp_path / "times.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "epoch_time.py"), "--study", str(study),
                           "--dataset", str(successor_file), "--steps", "1", "--isolate", "--json", str(timing)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    capsys.readouterr()
    ls.main([str(timing), "--study", "long", "--out", str(tmp_path / "page")])
    report = json.loads((tmp_path / "page.json").read_text())
    assert {(r["model"], r["L"]) for r in report["cost"]} == {(m, n) for m in ("sasrec", "mamba4rec") for n in (8, 16)}
    assert all(r["train_s"] >= 0 and r["train_added_bytes"] is not None for r in report["cost"])  # (rounded)
    from mlsa4rec.experiments.plots import log_log_slope

    for phase in ("train", "valid"):  # the fit over the lengths each model has a (non-zero, unrounded) time for
        for model in ("sasrec", "mamba4rec"):
            points = [(r["L"], r[f"{phase}_s"]) for r in report["cost"] if r["model"] == model and r[f"{phase}_s"] > 0]
            expected = log_log_slope(*zip(*points)) if points else None
            assert report["slopes"][phase][model]["seconds_per_epoch"] == expected
        assert Path(report["figures"][phase]).is_file()
    tables = {(t["group"], r["model"]): r for t in build_report("long")["tables"] for r in t["rows"]}
    for (group, model), length in ((("main", "sasrec"), 8), (("L16", "mamba4rec"), 16)):
        mine = report["accuracy"][f"{model}@{length}"]
        assert mine["all"]["ndcg@10"] == tables[group, model]["metrics"]["ndcg@10"][0]
        assert mine["longest"]["hit@10"] == tables[group, model]["metrics_longest"]["hit@10"][0]
    text = (tmp_path / "page.md").read_text()
    assert "## Accuracy" in text and "longest-history quarter" in text and "page-train.png" in text


def test_a_file_that_is_not_a_timing_is_one_error_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": [{"case": "x"}]}')
    with pytest.raises(SystemExit) as exit_:
        ls.main([str(bad)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
