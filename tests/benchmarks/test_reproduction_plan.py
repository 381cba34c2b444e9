"""benchmarks/reproduction_plan.py: the plan's hours from the committed timings and study files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
_spec = importlib.util.spec_from_file_location("reproduction_plan", REPO / "benchmarks" / "reproduction_plan.py")
plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan)


def test_every_cell_of_the_studies_is_counted_once(capsys) -> None:
    counts, eval_step, _ = plan.cells_per_case(REPO / "studies" / "reproduction.yaml", "amazon-beauty")
    assert counts["mlsa4rec-masked"] == 3 and counts["lightsans"] == 1 and eval_step["lrurec"] == 6
    counts, eval_step, _ = plan.cells_per_case(REPO / "studies" / "reproduction.yaml", "ml-1m")
    assert counts["sasrec/ml-1m-L200"] == 3 and "mlsa4rec-masked" not in counts and eval_step["lrurec"] == 1
    plan.main([])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| **")]
    # every timed case has its row: 11 + 11 (Amazon) + 10 (ML-1M) + 6 (ablations) + 12 (lengths), and the totals
    assert len([r for r in rows if r.count("|") == 7 and not r.startswith("| cell")]) == 50
    done, left = (float(x.strip(" *")) for x in out.rsplit("| **Total (training)** |", 1)[1].split("|")[:2])
    blocks = [r.split("|")[2:4] for r in rows if r.count("|") == 4 and r[2].isdigit()]
    assert len(blocks) == 5
    import json  # a case timed again after a speed-up replaces its row, and says so
    again = json.loads((REPO / "docs" / "results" / "epoch_time_lightsans_last_row_amazon-beauty.json").read_text())
    (r,) = again["results"]
    assert f"| lightsans | {r['measured_s_per_epoch']} + {r['valid_seconds']} | measured again |" in out
    assert abs(sum(float(d) for d, _ in blocks) - done) < 0.15 and abs(sum(float(x) for _, x in blocks) - left) < 0.15


def test_finished_cells_count_as_done_and_set_the_epochs_of_their_other_seeds(tmp_path, monkeypatch) -> None:
    """A finished cell's own seconds are hours done; its epochs replace the assumption for the seeds
    still to run."""
    import json
    import shutil

    import numpy as np

    (tmp_path / "studies").mkdir()
    shutil.copy(REPO / "studies" / "ablations.yaml", tmp_path / "studies" / "ablations.yaml")
    shutil.copytree(REPO / "configs", tmp_path / "configs")  # the study file's recipes, beside it as in the repo
    monkeypatch.setattr(plan, "REPO", tmp_path)
    results = REPO / "docs" / "results"
    _, done0, left0 = plan.block_table("3", "ablations", "amazon-beauty", results)
    assert done0 == 0  # no record in this copy
    study = plan.load_study(tmp_path / "studies" / "ablations.yaml", check=False)
    cell = next(c for c in study.cells if c.entry.label == "no-gate")
    record = cell.record_path(study.directory)
    record.parent.mkdir(parents=True)
    meta = {"format": 2, "epochs_run": 10, "train_seconds": 7200.0, "digests": {}}
    np.savez(record, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    text, done, left = plan.block_table("3", "ablations", "amazon-beauty", results)
    row = next(line for line in text.splitlines() if line.startswith("| no-gate |"))
    assert "10 (its 1 finished)" in row and "| 1 / 3 |" in row and done == 2.0
    assert left < left0  # two seeds left, at 10 epochs each, not three at the assumed 54


def test_a_sibling_datasets_finished_cells_set_the_epochs_until_its_own_finish(tmp_path, monkeypatch) -> None:
    """Video Games cells with no finished seed of their own expect the epochs their model ran on
    Beauty (the same recipe), not the static assumption; their own record, once written, wins."""
    import json
    import shutil

    import numpy as np

    (tmp_path / "studies").mkdir()
    shutil.copy(REPO / "studies" / "reproduction.yaml", tmp_path / "studies" / "reproduction.yaml")
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.setattr(plan, "REPO", tmp_path)
    results = REPO / "docs" / "results"

    def row(text: str) -> str:
        return next(line for line in text.splitlines() if line.startswith("| gru4rec |"))

    def record(dataset: str, epochs: int) -> None:
        study = plan.load_study(tmp_path / "studies" / "reproduction.yaml", check=False)
        cell = next(c for c in study.cells if c.entry.label == "gru4rec" and plan.dataset_name(c.dataset) == dataset)
        path = cell.record_path(study.directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": 2, "epochs_run": epochs, "train_seconds": 600.0, "digests": {}}
        np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))

    text, _, left0 = plan.block_table("1", "reproduction", "amazon-video-games", results)
    assert f"{plan.AMAZON['gru4rec']} (assumed)" in row(text)
    record("amazon-beauty", 200)
    text, _, left1 = plan.block_table("1", "reproduction", "amazon-video-games", results)
    assert "200 (Beauty's 1 finished)" in row(text) and left1 > left0
    record("amazon-video-games", 30)
    text, done, _ = plan.block_table("1", "reproduction", "amazon-video-games", results)
    assert "30 (its 1 finished)" in row(text) and "| 1 / 1 |" in row(text) and abs(done - 600 / 3600) < 1e-9


def test_a_group_s_repeat_expects_its_model_s_main_group_epochs_until_its_own_finish(tmp_path, monkeypatch) -> None:
    """The L = 200 repeat on ML-1M has no record of its own at first: it expects the epochs its model
    ran in the main group there, as `study run --whole-cells` does, not the static assumption."""
    import json
    import shutil

    import numpy as np

    (tmp_path / "studies").mkdir()
    shutil.copy(REPO / "studies" / "reproduction.yaml", tmp_path / "studies" / "reproduction.yaml")
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.setattr(plan, "REPO", tmp_path)
    results = REPO / "docs" / "results"
    study = plan.load_study(tmp_path / "studies" / "reproduction.yaml", check=False)

    def row(text: str) -> str:
        return next(line for line in text.splitlines() if line.startswith("| sasrec/ml-1m-L200 |"))

    def record(group: str, epochs: int) -> None:
        cell = next(c for c in study.cells if c.entry.label == "sasrec" and c.group == group
                    and plan.dataset_name(c.dataset) == "ml-1m" and c.seed == 2020)
        path = cell.record_path(study.directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": 2, "epochs_run": epochs, "train_seconds": 600.0, "digests": {}}
        np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))

    text, _, left0 = plan.block_table("2", "reproduction", "ml-1m", results)
    assert "60 (assumed)" in row(text)
    record("main", 22)
    text, _, left1 = plan.block_table("2", "reproduction", "ml-1m", results)
    assert "22 (main group's 1 finished)" in row(text) and left1 < left0
    record("ml-1m-L200", 35)
    text, _, _ = plan.block_table("2", "reproduction", "ml-1m", results)
    assert "35 (its 1 finished)" in row(text) and "| 1 / 3 |" in row(text)
