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
    counts, eval_step = plan.cells_per_case(REPO / "studies" / "reproduction.yaml", "amazon-beauty")
    assert counts["mlsa4rec-masked"] == 3 and counts["lightsans"] == 1 and eval_step["lrurec"] == 6
    counts, eval_step = plan.cells_per_case(REPO / "studies" / "reproduction.yaml", "ml-1m")
    assert counts["sasrec/ml-1m-L200"] == 3 and "mlsa4rec-masked" not in counts and eval_step["lrurec"] == 1
    plan.main([])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| **")]
    # every timed case has its row: 11 + 11 (Amazon) + 10 (ML-1M) + 6 (ablations) + 12 (lengths), and the totals
    assert len([r for r in rows if r.count("|") == 7 and not r.startswith("| cell")]) == 50
    total = float(out.rsplit("**Total (training)** | **", 1)[1].split("**")[0])
    blocks = [float(r.split("|")[2]) for r in rows if r.count("|") == 3 and r[2].isdigit()]
    assert len(blocks) == 5 and abs(sum(blocks) - total) < 0.15
