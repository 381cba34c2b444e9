"""benchmarks/ann_recall.py: the approximate index's recall against the exact top k, on a small table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py from beside them


def test_recall_and_latency_are_measured_against_the_exact_top_k(tmp_path: Path) -> None:
    pytest.importorskip("usearch", reason="the ann extra is not installed (pip install 'mlsa4rec[ann]')")
    spec = importlib.util.spec_from_file_location("ann_recall", REPO / "benchmarks" / "ann_recall.py")
    ann_recall = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ann_recall)
    index = tmp_path / "items.usearch"
    result = ann_recall.measure(3_000, [16, 512], requests=30, index_file=index)
    assert result["whole_row_equals_exact"] == 30  # the old path and the chunked one agree
    assert index.exists() and "index_build_s" in result
    low, high = result["ann_ef16"]["recall@10"], result["ann_ef512"]["recall@10"]
    assert 0 <= low <= high <= 1 and high > 0.9  # a wide search of a small index finds nearly all
    again = ann_recall.measure(3_000, [512], requests=30, index_file=index)  # the saved index, reused
    assert "index_loaded_s" in again and again["ann_ef512"] == {**again["ann_ef512"], "recall@10": high}


def test_saved_results_are_kept_by_catalogue_size(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("ann_recall", REPO / "benchmarks" / "ann_recall.py")
    ann_recall = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ann_recall)
    out = tmp_path / "ann_recall.json"
    ann_recall.save({"items": 1_000_000, "v": 1}, out, "first")
    ann_recall.save({"items": 100_000, "v": 2}, out, "second")
    ann_recall.save({"items": 1_000_000, "v": 3}, out, "third")  # a new measurement of a size replaces the old
    kept = json.loads(out.read_text())
    assert list(kept) == ["100000", "1000000"]
    assert kept["1000000"] == {"items": 1_000_000, "v": 3, "command": "third"} and kept["100000"]["command"] == "second"
