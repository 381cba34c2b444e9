"""ranking_metrics against an independent, loop-based implementation of the definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.metrics import metrics_from_ranks, parse_metric, per_user_metrics, ranking_metrics, target_ranks


def reference_metrics(scores: np.ndarray, targets: np.ndarray, ks: list[int]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for row, t in zip(scores, targets):
        rank = 1 + sum(1 for s in row if s > row[t])  # items strictly above the target
        for k in ks:
            hit = 1.0 if rank <= k else 0.0
            out.setdefault(f"hit@{k}", []).append(hit)
            out.setdefault(f"recall@{k}", []).append(hit)
            out.setdefault(f"precision@{k}", []).append(hit / k)
            out.setdefault(f"ndcg@{k}", []).append(hit / math.log2(rank + 1))
            out.setdefault(f"mrr@{k}", []).append(hit / rank)
    return {k: sum(v) / len(v) for k, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_implementation_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=(64, 40)).astype(np.float64)  # coarse scores: many ties
    scores[:, 0] = -np.inf                                          # padding column
    targets = rng.integers(1, 40, size=64)
    ks = [1, 5, 10, 20]
    got = ranking_metrics(scores, targets, ks)
    want = reference_metrics(scores, targets, ks)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_torch_and_numpy_inputs_agree() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(50, 100)).astype(np.float32)
    targets = rng.integers(1, 100, size=50)
    a = ranking_metrics(scores, targets, [10])
    b = ranking_metrics(torch.from_numpy(scores), torch.from_numpy(targets), [10])
    assert a == b


def test_known_values() -> None:
    scores = [[-np.inf, 0.9, 0.5, 0.1], [-np.inf, 0.2, 0.3, 0.4]]
    # row 0: target 2 has rank 2; row 1: target 1 has rank 3
    assert target_ranks(scores, [2, 1]).tolist() == [2, 3]
    m = ranking_metrics(scores, [2, 1], ks=[2, 3], metrics=["hit", "ndcg", "mrr", "precision"])
    assert m["hit@2"] == 0.5
    assert m["ndcg@2"] == pytest.approx(0.5 / math.log2(3))
    assert m["mrr@3"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m["precision@3"] == pytest.approx(1 / 3)


def test_per_user_values_and_metric_names() -> None:
    per_user = per_user_metrics([1, 3, 12], ks=[10], metrics=["ndcg", "mrr"])
    assert per_user["ndcg@10"].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert per_user["mrr@10"].tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    assert parse_metric("NDCG@20") == ("ndcg", 20)
    for bad in ("ndcg", "ndcg@0", "ndcg@x", "auc@10"):
        with pytest.raises(MLSA4RecError, match="NAME@K"):
            parse_metric(bad)


def test_ties_are_optimistic() -> None:
    assert target_ranks([[0.0, 1.0, 1.0, 1.0]], [3]).tolist() == [1]


def test_bad_inputs() -> None:
    with pytest.raises(MLSA4RecError, match="one target per row"):
        ranking_metrics(np.zeros((2, 3)), [1])
    with pytest.raises(MLSA4RecError, match="target ids"):
        ranking_metrics(np.zeros((1, 3)), [3])
    with pytest.raises(MLSA4RecError, match="NaN"):
        ranking_metrics(np.array([[0.0, np.nan]]), [1])
    with pytest.raises(MLSA4RecError, match="NaN"):  # a NaN elsewhere in the row hides a rank too
        ranking_metrics(np.array([[np.nan, 0.5]]), [1])
    with pytest.raises(MLSA4RecError, match="positive"):
        ranking_metrics(np.zeros((1, 3)), [1], ks=[0])
    with pytest.raises(MLSA4RecError, match="unknown metric"):
        metrics_from_ranks([1], metrics=["auc"])
    with pytest.raises(MLSA4RecError, match="zero rows"):
        metrics_from_ranks([])
