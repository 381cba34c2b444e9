"""Paired significance of the difference between two models scored on the same users.

Both models rank the same target of the same user, so the test is paired: per-user differences
cancel the large spread between easy and hard users, which an unpaired view of two means cannot.
Following common IR practice (Smucker et al., CIKM 2007: the t-test, the bootstrap and the
randomization test agree on collections of this size; Wilcoxon and the sign test do not) we report

* the two means and the relative difference ``candidate / baseline - 1``, the number papers quote;
* a paired bootstrap confidence interval of that relative difference (users resampled with
  replacement, percentile method; ``scipy.stats.bootstrap``);
* the two-sided paired t-test p-value of the mean per-user difference (``scipy.stats.ttest_rel``).

When several candidates are compared with one baseline, the p-values are also Holm-adjusted so
that "significant" keeps its meaning over the whole table.

A relative difference is undefined when the baseline's mean is 0 (``relative``, ``ci_low`` and
``ci_high`` are None), and so is the interval alone when resamples that miss the baseline's few
non-zero users push a bound to infinity; the p-value, a test of the plain difference, is always a
number, so such a row stays in the table and in the Holm family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.metrics import parse_metric, per_user_metrics


@dataclass(frozen=True)
class PairedComparison:
    metric: str
    users: int
    baseline: float
    candidate: float
    relative: float | None  # candidate / baseline - 1; None when the baseline's mean is 0
    ci_low: float | None  # bootstrap confidence interval of ``relative``; both None when either end is not finite
    ci_high: float | None
    confidence: float
    p_value: float  # two-sided paired t-test
    p_holm: float | None = None  # set by ``holm`` over a family of comparisons

    def to_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise MLSA4RecError(f"confidence must lie in (0, 1), got {confidence}")


def _relative(baseline: np.ndarray, candidate: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample whose baseline mean is 0: inf or nan
        return candidate.mean(axis=axis) / baseline.mean(axis=axis) - 1.0


def compare_ranks(
    baseline_ranks: np.ndarray | Sequence[int],
    candidate_ranks: np.ndarray | Sequence[int],
    metric: str = "ndcg@10",
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Compare two models from their target ranks for the same users in the same order."""
    name, k = parse_metric(metric)
    a_ranks, b_ranks = np.asarray(baseline_ranks).reshape(-1), np.asarray(candidate_ranks).reshape(-1)
    if a_ranks.shape != b_ranks.shape:
        raise MLSA4RecError(f"the two models ranked different users ({a_ranks.size} and {b_ranks.size} rows); "
                            "compare runs on the same dataset and split")
    if a_ranks.size < 2:
        raise MLSA4RecError("a paired test needs at least two users")
    check_confidence(confidence)
    key = f"{name}@{k}"
    a = per_user_metrics(a_ranks, [k], [name])[key].numpy()
    b = per_user_metrics(b_ranks, [k], [name])[key].numpy()
    return compare_values(a, b, key, confidence, n_resamples, seed)


def compare_values(a: np.ndarray, b: np.ndarray, metric: str, confidence: float = 0.95, n_resamples: int = 10_000,
                   seed: int = 0) -> PairedComparison:
    """Compare two models from their per-user values of ``metric`` (same users, same order): a
    metric of one run each, or each user's metric averaged over the seeds of a study."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size < 2:
        raise MLSA4RecError(f"a paired test needs the same users on both sides, at least two ({a.size} and {b.size})")
    check_confidence(confidence)
    key = metric
    diff = b - a
    if not diff.any():  # the same value for every user (also both 0): no evidence of a difference
        p = 1.0
    elif np.ptp(diff) == 0:  # a constant non-zero difference has no spread: t is infinite, scipy would give NaN
        p = 0.0
    else:
        p = float(stats.ttest_rel(b, a).pvalue)
    relative, low, high = None, None, None
    if a.mean() != 0.0:  # else candidate / baseline is undefined, and so is its interval
        relative = float(_relative(a, b))
        if not diff.any():
            low, high = 0.0, 0.0
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                ci = stats.bootstrap((a, b), _relative, paired=True, vectorized=True, n_resamples=n_resamples,
                                     confidence_level=confidence, method="percentile", batch=250,
                                     rng=np.random.default_rng(seed)).confidence_interval
            if np.isfinite(ci.low) and np.isfinite(ci.high):
                low, high = float(ci.low), float(ci.high)
    return PairedComparison(metric=key, users=int(a.size), baseline=float(a.mean()), candidate=float(b.mean()),
                            relative=relative, ci_low=low, ci_high=high, confidence=confidence, p_value=p)


def holm(comparisons: Sequence[PairedComparison]) -> list[PairedComparison]:
    """The same comparisons with Holm-Bonferroni adjusted p-values (family-wise error control)."""
    m = len(comparisons)
    order = sorted(range(m), key=lambda i: comparisons[i].p_value)
    adjusted = [0.0] * m
    running = 0.0
    for position, i in enumerate(order):
        running = max(running, min(1.0, (m - position) * comparisons[i].p_value))
        adjusted[i] = running
    return [PairedComparison(**{**c.to_dict(), "p_holm": adjusted[i]}) for i, c in enumerate(comparisons)]
