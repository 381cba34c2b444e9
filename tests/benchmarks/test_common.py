"""benchmarks/common.py: the timing, the machine record, the tables and the report files every script shares."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py from beside them
import common  # noqa: E402


def test_warm_up_calls_are_not_timed_and_the_budget_stops_the_repeats() -> None:
    calls = []
    times = common.repeat_timed(lambda: calls.append(1), repeats=3, warmup=2, sync=lambda: calls.append("sync"))
    assert len(times) == 3 and calls == [1, "sync"] * 5
    assert len(common.repeat_timed(lambda: None, repeats=1000, warmup=0, budget_s=0.0)) == 1  # at least one call
    assert common.median_ms([0.001, 0.003, 1.0]) == pytest.approx(3.0)
    assert common.time_once(lambda: 7)[0] == 7


def test_the_machine_record_and_the_command() -> None:
    m = common.machine(threads=3)
    assert {"cpu", "cores", "threads", "torch", "python", "gpu", "commit"} <= set(m) and m["threads"] == 3
    assert "commit" not in common.machine(commit=False) and "threads" not in common.machine()
    shown = common.command("/x/benchmarks/step_time.py", ["--out", "a b"])
    assert shown == "python benchmarks/step_time.py --out 'a b'"


def test_tables_and_reports(tmp_path: Path) -> None:
    assert common.table(["model", "ms"], [["a", 1.5]], align="lr") == "| model | ms |\n|---|---:|\n| a | 1.5 |"
    paths = common.write_report(tmp_path / "deep" / "r", {"x": 1}, "# page\n")
    assert paths == [tmp_path / "deep" / "r.json", tmp_path / "deep" / "r.md"]
    assert json.loads(paths[0].read_text()) == {"x": 1} and paths[1].read_text() == "# page\n"
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["r.json", "r.md"]  # no temporary file left


def test_a_missing_dataset_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="^error: data directory .* does not exist"):
        common.load_or_exit("ml-1m", tmp_path / "absent")


def test_common_imports_only_the_standard_library() -> None:
    """recbole_parity.py imports it inside RecBole's venv, where mlsa4rec and numpy may be absent."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import common; "
            "print(sorted(m for m in ('torch', 'numpy', 'mlsa4rec') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
