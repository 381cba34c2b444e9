"""benchmarks/epoch_time.py --study: the study's own cells timed, one per model and group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "epoch_time.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_study_s_cells_are_timed_with_their_own_settings(successor_file: Path, tmp_path: Path) -> None:
    study = tmp_path / "tiny.yaml"
    study.write_text(f"""
study: tiny
datasets: [{successor_file}]
seeds: [1, 2]
models:
  sasrec: {{set: {{hidden_size: 8, n_heads: 1, train_batch_size: 32, MAX_ITEM_LIST_LENGTH: 12}}}}
  causal: {{model: mlsa4rec, set: {{variant: causal, hidden_size: 8, n_heads: 1, train_batch_size: 64}}}}
groups:
  long: {{models: [causal], set: {{MAX_ITEM_LIST_LENGTH: 24}}}}
""")
    out = tmp_path / "times.json"
    done = run_script("--study", str(study), "--dataset", str(successor_file), "--steps", "2", "--full",
                      "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = {(r["case"], r["L"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {("sasrec", 12), ("causal", 50), ("causal/long", 24)}  # one per model and group
    assert rows[("sasrec", 12)]["batch"] == 32 and rows[("causal", 50)]["batch"] == 64
    assert all(r["measured_s_per_epoch"] >= 0 and r["valid_seconds"] >= 0 for r in rows.values())  # (rounded: 0.0)
    # --isolate: each case in a process of its own, the same rows
    done = run_script("--study", str(study), "--dataset", str(successor_file), "--steps", "1", "--isolate",
                      "--json", str(out))
    assert done.returncode == 0, done.stderr
    isolated = json.loads(out.read_text())["results"]
    assert [(r["case"], r["L"]) for r in isolated] == list(rows) and all(r["peak_train_rss_bytes"] for r in isolated)
    for r in isolated:  # the widest batch's step too: the longest windows the epoch holds, at most L
        size, width = r["widest_batch"]
        assert 0 < size <= r["batch"] and 1 < width <= r["L"] and r["peak_widest_step_rss_bytes"] > 0


def test_a_dataset_outside_the_study_is_one_error_line(successor_file: Path, tmp_path: Path) -> None:
    study = tmp_path / "tiny.yaml"
    study.write_text(f"study: tiny\ndatasets: [{successor_file}]\nseeds: [1]\nmodels:\n  sasrec: {{}}\n")
    other = tmp_path / "other.txt"
    other.write_text(successor_file.read_text())
    done = run_script("--study", str(study), "--dataset", str(other), "--steps", "1")
    assert done.returncode != 0 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "no cell on" in done.stderr
