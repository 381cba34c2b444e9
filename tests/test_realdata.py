"""The real-data path end to end: read shared/data, train briefly, evaluate (skips without data)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mlsa4rec.data import load_dataset
from mlsa4rec.training.run import train

pytestmark = pytest.mark.realdata


def test_ml1m_builds_fast_and_is_cached(shared_data: Path) -> None:
    t0 = time.perf_counter()
    data = load_dataset("ml-1m", shared_data, use_cache=False)
    built = time.perf_counter() - t0
    assert data.n_interactions == 999_611
    # generous bound (the build takes ~0.6 s here): catches a per-event Python loop, not noise
    assert built < 20, built
    assert len(data.train_targets()) == 981_491
    assert len(data.eval_targets("valid")) == len(data.eval_targets("test")) == 6040


def test_sasrec_one_epoch_on_beauty(shared_data: Path, tmp_path: Path) -> None:
    results = train("sasrec", "amazon-beauty", tmp_path / "run", data_dir=shared_data,
                    overrides={"epochs": 1, "train_batch_size": 256, "learning_rate": 0.002})
    # one epoch is far from converged, but already ~20x better than chance (10 / 12101 = 0.0008)
    assert results["dataset"]["users"] == 22_363
    assert results["test"]["hit@10"] > 0.015, results["test"]
    assert results["valid"]["ndcg@10"] > 0.007, results["valid"]
