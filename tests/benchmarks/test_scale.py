"""benchmarks/scale_data.py and benchmarks/scale.py: the synthetic data at scale and the scaling probes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mlsa4rec.data.dataset import build_sequences
from mlsa4rec.data.readers import read_interactions

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py and each other from beside them


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scale_data, scale = _load("scale_data"), _load("scale")


def test_the_generator_is_seeded_exact_and_ordered() -> None:
    a, b = scale_data.generate(500, 20_000, seed=3), scale_data.generate(500, 20_000, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["item_id"], scale_data.generate(500, 20_000, seed=4)["item_id"])
    users, items, stamps = a["user_id"], a["item_id"], a["timestamp"]
    assert len(users) == 20_000 and items.min() >= 1 and items.max() <= 500
    lengths = np.bincount(users)[1:]
    assert lengths.min() >= 5 and lengths.max() > 5 * lengths.mean()  # at least 5 each, a long tail
    same = users[1:] == users[:-1]
    assert np.all(np.diff(stamps)[same] > 0)  # each user's events in time, never two in one second
    counts = np.sort(np.bincount(items, minlength=501)[1:])[::-1]
    assert counts[:5].sum() > 10 * counts[-5:].sum()  # power-law popularity


def test_the_generated_sequences_are_learnable() -> None:
    """Most next items are a few steps along the ring from the last one: the best single successor of
    each item predicts far more than the most popular item does."""
    cols = scale_data.generate(300, 30_000, seed=0)
    users, items = cols["user_id"], cols["item_id"]
    same = users[1:] == users[:-1]
    prev, nxt = items[:-1][same], items[1:][same]
    pairs = np.bincount(prev * 301 + nxt, minlength=301 * 301).reshape(301, 301)
    successor = pairs.max(axis=1).sum() / same.sum()
    popular = np.bincount(items).max() / len(items)
    assert successor > 2 * popular


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_both_formats_hold_the_same_events(tmp_path: Path, suffix: str) -> None:
    cols = scale_data.generate(200, 5_000, seed=1)
    path = tmp_path / f"d.{suffix}"
    scale_data.write(cols, path, row_group=1_000)
    inter = read_interactions(path)
    assert inter.timed and np.array_equal(inter.user.astype(np.int64), cols["user_id"])
    assert np.array_equal(inter.item.astype(np.int64), cols["item_id"])
    assert np.array_equal(inter.time, cols["timestamp"].astype(np.float64))
    assert build_sequences(inter, "d").n_interactions > 0


def test_a_probe_reports_its_peak_memory_and_is_stopped_at_its_limits(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    scale_data.write(scale_data.generate(100, 3_000, seed=2), path)
    row = scale.measure("prepare", {"file": str(path)}, limit_s=120, cap_bytes=20 * scale.GIB)
    assert row["status"] == "ok" and row["events_kept"] > 0 and row["peak_rss_gib"] >= row["start_rss_gib"] > 0
    stopped = scale.measure("prepare", {"file": str(path)}, limit_s=120, cap_bytes=1)
    assert stopped["status"] == "stopped: over 0 GiB" and "seconds" not in stopped
    missing = {"file": str(tmp_path / "missing.parquet")}
    broken = scale.measure("prepare", missing, limit_s=120, cap_bytes=20 * scale.GIB)
    assert broken["status"].startswith("failed: ") and "does not exist" in broken["status"]


def test_the_report_is_made_from_the_rows_alone(tmp_path: Path, monkeypatch) -> None:
    rows = []
    for phase, peak in (("before", 3.0), ("after", 1.0)):
        for events in (1_000_000, 10_000_000):
            rows.append({"stage": "prepare", "phase": phase, "items": 10_000, "events": events, "format": "csv",
                         "status": "ok", "seconds": events / 1e6, "peak_rss_gib": peak * events / 1e6 + 0.3,
                         "start_rss_gib": 0.3, "note": "quiet"})
    rows.append({"stage": "step", "phase": "before", "items": 1_000_000, "length": 50, "loss": "CE", "set": [],
                 "status": "stopped: over 900 s", "peak_rss_gib": 1.5, "note": "quiet"})
    results = tmp_path / "scale.json"
    results.write_text(json.dumps({"rows": rows}))
    monkeypatch.setattr(sys, "argv", ["scale.py", "report", "--results", str(results)])
    scale.main(["report", "--results", str(results)])
    page = results.with_suffix(".md").read_text()
    assert "| 10,000,000 | 10,000 | 10 | 30.30 | 3,221 | quiet | 10 | 10.30 | 1,074 | quiet |" in page
    assert "| 1,000,000 | 50 | CE | before | over 900 s | 1.50 | quiet |" in page
    assert "bytes/event at 1,000,000" in page and results.with_suffix(".png").stat().st_size > 10_000
    assert "Serving target: not measured yet" in page and "approximate index" not in page
    # benchmarks/ann_recall.py --save beside scale.json: its rows and the serving target join the page
    rows.append({"stage": "serve", "phase": "after", "items": 1_000_000, "status": "ok", "p99_ms": 61.7,
                 "peak_rss_gib": 0.7, "note": "quiet"})
    results.write_text(json.dumps({"rows": rows}))
    timing = {"p50_ms": 5.0, "p99_ms": 7.5}
    (tmp_path / "ann_recall.json").write_text(json.dumps({"1000000": {
        "items": 1_000_000, "requests": 200, "exact_chunked": {"p50_ms": 20.0, "p99_ms": 30.0}, "whole_row": timing,
        "whole_row_equals_exact": 200, "index_loaded_s": 2.5, "ann_ef512": {"recall@10": 0.9271, **timing},
        "command": "python benchmarks/ann_recall.py --items 1e6", "machine": {"commit": "abcdef0123"}}}))
    scale.main(["report", "--results", str(results)])
    page = results.with_suffix(".md").read_text()
    assert ("exact p99 62 ms (the whole request); the approximate index's ranking at its default ef 512: p99 7.5 ms "
            "at recall@10 0.927 (against the exact ranking's p99 of 30.0 ms") in page
    assert "| 1,000,000 | HNSW, ef 512 | 0.927 | 5.00 | 7.50 |" in page and "loaded in 2.5 s;" in page
