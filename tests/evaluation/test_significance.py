"""Paired comparison of two models' per-user ranks: the numbers, the interval, Holm, the errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation.significance import PairedComparison, compare_ranks, holm


def _ranks(n: int, seed: int, hit_rate: float) -> np.ndarray:
    """Ranks with about ``hit_rate`` of users inside the top 10, the rest far below."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < hit_rate, rng.integers(1, 11, n), rng.integers(11, 5000, n))


def test_identical_models_differ_by_nothing() -> None:
    r = _ranks(500, 0, 0.1)
    c = compare_ranks(r, r.copy(), "ndcg@10")
    assert (c.relative, c.ci_low, c.ci_high, c.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert c.users == 500 and c.baseline == c.candidate > 0


def test_a_constant_difference_is_certain() -> None:
    c = compare_ranks(np.full(50, 2), np.ones(50, int), "mrr@10")
    assert c.relative == pytest.approx(1.0) and c.p_value == 0.0 and c.ci_low == pytest.approx(1.0)


def test_numbers_match_a_hand_computation() -> None:
    base = _ranks(4000, 1, 0.08)
    better = base.copy()
    rng = np.random.default_rng(2)
    lifted = rng.choice(np.flatnonzero(base > 10), 120, replace=False)
    better[lifted] = 1                                              # 120 more users hit at rank 1
    c = compare_ranks(base, better, "hit@10", seed=3)
    hit_a, hit_b = (base <= 10).mean(), (better <= 10).mean()
    assert c.baseline == pytest.approx(hit_a) and c.candidate == pytest.approx(hit_b)
    assert c.relative == pytest.approx(hit_b / hit_a - 1) and c.metric == "hit@10"
    # the paired t-test, transcribed: t = mean(d) / (sd(d) / sqrt(n)) with n - 1 degrees of freedom
    d = (better <= 10).astype(float) - (base <= 10)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
    assert c.p_value == pytest.approx(2 * stats.t.sf(abs(t), d.size - 1), rel=1e-9)
    assert c.p_value < 1e-6 and 0 < c.ci_low < c.relative < c.ci_high
    # swapping the roles flips the sign, not the evidence
    swapped = compare_ranks(better, base, "hit@10", seed=3)
    assert swapped.relative == pytest.approx(hit_a / hit_b - 1) and swapped.p_value == pytest.approx(c.p_value)
    assert swapped.ci_high < 0


def test_interval_is_seeded_and_narrows_with_more_users() -> None:
    def width(n: int) -> float:
        c = compare_ranks(_ranks(n, 4, 0.1), _ranks(n, 5, 0.12), "mrr@10", n_resamples=2000, seed=0)
        return c.ci_high - c.ci_low

    a, b = _ranks(1000, 4, 0.1), _ranks(1000, 5, 0.12)
    assert compare_ranks(a, b, seed=7) == compare_ranks(a, b, seed=7)
    assert compare_ranks(a, b, seed=7).ci_low != compare_ranks(a, b, seed=8).ci_low
    assert width(16_000) < 0.4 * width(1000)                      # about 1/sqrt(16) = 0.25
    assert compare_ranks(a, b, confidence=0.99, seed=0).ci_low < compare_ranks(a, b, confidence=0.8, seed=0).ci_low


def test_holm_adjustment() -> None:
    rows = [PairedComparison("ndcg@10", 10, 0.1, 0.1, 0.0, 0.0, 0.0, 0.95, p) for p in (0.01, 0.04, 0.03)]
    assert [r.p_holm for r in holm(rows)] == pytest.approx([0.03, 0.06, 0.06])
    assert [r.p_value for r in holm(rows)] == [0.01, 0.04, 0.03]
    assert holm([PairedComparison("hit@10", 10, 0.1, 0.1, 0.0, 0.0, 0.0, 0.95, 0.6)] * 3)[0].p_holm == 1.0


@pytest.mark.parametrize(("args", "message"), [
    ((np.ones(5, int), np.ones(6, int)), "different users"),
    ((np.ones(5, int), np.ones(5, int), "ndcg"), "NAME@K"),
    ((np.ones(5, int), np.ones(5, int), "auc@10"), "NAME@K"),
    ((np.ones(1, int), np.ones(1, int)), "at least two users"),
])
def test_bad_inputs(args, message) -> None:
    with pytest.raises(MLSA4RecError, match=message):
        compare_ranks(*args)


def test_zero_baseline_gives_an_undefined_row_not_an_error() -> None:
    """One metric at 0 for the baseline must not cost the whole table: its relative numbers are None."""
    c = compare_ranks(np.full(5, 50), np.ones(5, int), "ndcg@10")
    assert (c.baseline, c.candidate) == (0.0, 1.0)
    assert (c.relative, c.ci_low, c.ci_high) == (None, None, None)
    assert c.p_value == 0.0  # a constant non-zero difference: certain
    varied = compare_ranks(np.full(40, 50), np.where(np.arange(40) % 4 == 0, 1, 50), "hit@10")
    d = (np.arange(40) % 4 == 0).astype(float)
    assert varied.relative is None and varied.p_value == pytest.approx(stats.ttest_rel(d, np.zeros(40)).pvalue)
    row = c.to_dict()
    assert row["relative"] is None and row["ci_low"] is None and row["ci_high"] is None and row["p_value"] == 0.0


def test_a_zero_difference_is_no_evidence() -> None:
    """Both models equal on every user (here both 0): p = 1, whatever the ranks below the cut-off."""
    c = compare_ranks(np.full(6, 50), np.full(6, 70), "mrr@10")
    assert (c.baseline, c.candidate, c.relative, c.ci_low, c.ci_high, c.p_value) == (0.0, 0.0, None, None, None, 1.0)
    same = compare_ranks(np.array([1, 20, 3, 50]), np.array([1, 30, 3, 60]), "hit@10")  # ranks differ, hits do not
    assert (same.relative, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_an_unbounded_interval_is_undefined() -> None:
    """A baseline hit by one user: resamples without that user divide by zero, so the interval has no finite
    upper end; it is reported as None, never as inf (not valid JSON), and without numpy warnings."""
    base = np.full(200, 50)
    base[0] = 1
    cand = np.full(200, 50)
    cand[:40] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = compare_ranks(base, cand, "hit@10", n_resamples=1000)
    assert c.relative == pytest.approx(39.0) and (c.ci_low, c.ci_high) == (None, None) and c.p_value < 1e-6


def test_holm_takes_undefined_rows() -> None:
    rows = [compare_ranks(np.full(5, 50), np.ones(5, int), "ndcg@10"),
            compare_ranks(np.full(6, 50), np.full(6, 70), "mrr@10"),
            PairedComparison("hit@10", 10, 0.1, 0.2, 1.0, 0.5, 1.5, 0.95, 0.02)]
    adjusted = holm(rows)
    assert [r.p_holm for r in adjusted] == pytest.approx([0.0, 1.0, 0.04])
    assert adjusted[0].relative is None and adjusted[1].ci_low is None
