"""benchmarks/ddp_step.py: a rank's step under real torchrun, its item table summed whole or by rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_one_and_two_ranks_follow_the_same_trajectory_whichever_exchange() -> None:
    # 70,000 items: a table tall enough to be summed by rows (ROW_SPARSE_MIN_ROWS = 65,536)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ddp_step.py"), "--items", "7e4", "--length", "8",
                           "--batch", "16", "--negatives", "64", "--steps", "2", "--threads", "1",
                           "--exchange", "dense", "rows", "--json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout[done.stdout.index("["):])
    assert [(r["nproc"], r["exchange"]) for r in rows] == [(1, "-"), (2, "dense"), (2, "rows")]
    for r in rows:
        assert r["step"] == pytest.approx(r["compute"] + r["communicate"] + r["update"])
        assert r["peak_gib_per_rank"] > 0 and r["loss_after"] == pytest.approx(rows[0]["loss_after"], rel=1e-5)
    assert "70,000 items" in done.stdout and "item table 17 MiB" in done.stdout
