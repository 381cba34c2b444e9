"""benchmarks/sharded_table.py: the item table sharded by TorchRec (its own environment, not the project's).

The project's environment has no TorchRec (it pins its own torch and an fbgemm built for it), so here
the script must stop with one error line naming the environment to make; where TorchRec is importable,
a small real run checks that row-wise sharding halves what a rank holds and keeps the trajectory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "sharded_table.py"


def _torchrec_usable() -> bool:
    if importlib.util.find_spec("torchrec") is None or importlib.util.find_spec("fbgemm_gpu") is None:
        return False
    done = subprocess.run([sys.executable, "-c", "import fbgemm_gpu, torchrec"], capture_output=True, timeout=120)
    return done.returncode == 0


def test_without_torchrec_one_error_line_names_the_environment() -> None:
    if _torchrec_usable():
        pytest.skip("TorchRec is importable here: the refusal cannot be seen")
    done = subprocess.run([sys.executable, str(SCRIPT), "--items", "1e3"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TorchRec is not usable here")
    assert "fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0" in lines[0]


def test_row_wise_sharding_splits_the_rows_and_keeps_the_trajectory() -> None:
    if not _torchrec_usable():
        pytest.skip("TorchRec is not installed in this environment (benchmarks/sharded_table.py makes its own)")
    small = ["--items", "2e4", "--dim", "8", "--length", "5", "--batch", "16", "--negatives", "32", "--steps", "2",
             "--nproc", "1", "2", "--sharding", "row_wise"]
    done = subprocess.run([sys.executable, str(SCRIPT), *small, "--json"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout[done.stdout.index("["):])
    one, two = rows
    assert [v["rows"] for v in one["ranks"]] == [20_000] and [v["rows"] for v in two["ranks"]] == [10_000, 10_000]
    assert two["loss_after"] == pytest.approx(one["loss_after"], rel=1e-5)
