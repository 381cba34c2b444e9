"""Ranking metrics for next-item prediction with one target per row (full ranking).

Definitions (``../shared/reference/MLSA4REC.md`` section 5), with r the target's 1-based rank:

* ``hit@K`` = 1 if r <= K (equal to ``recall@K`` with a single target)
* ``ndcg@K`` = 1 / log2(r + 1) if r <= K
* ``mrr@K`` = 1 / r if r <= K
* ``precision@K`` = hit@K / K

**Ties.** r = 1 + the number of items whose score is *strictly higher* than the target's, so an
item tied with the target does not push it down (the optimistic rule). With continuous scores
ties are vanishingly rare; a model that returns constant scores is not rewarded in practice
because the trainer never produces one, but a caller comparing hand-made scores should know the
rule. Columns scored ``-inf`` (the padding column, excluded history) can never outrank a target.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from mlsa4rec.errors import MLSA4RecError

METRICS = ("hit", "ndcg", "mrr", "recall", "precision")


def _as_tensor(x: torch.Tensor | np.ndarray | Sequence, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def target_ranks(scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
    """1-based rank of each row's target: 1 + #items scored strictly higher (LongTensor, rows)."""
    s = _as_tensor(scores)
    if not torch.is_floating_point(s):
        s = s.double()
    t = _as_tensor(targets, torch.long).to(s.device).reshape(-1)
    if s.dim() != 2 or s.shape[0] != t.shape[0]:
        raise MLSA4RecError(
            f"scores must be rows x items with one target per row; got {tuple(s.shape)} and {t.shape[0]} targets"
        )
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= s.shape[1]):
        raise MLSA4RecError(f"target ids must lie in [0, {s.shape[1] - 1}]")
    if torch.isnan(s).any():
        raise MLSA4RecError("scores contain NaN; the model produced non-finite outputs")
    target_scores = s.gather(1, t[:, None])
    return (s > target_scores).sum(dim=1) + 1


def per_user_metrics(
    ranks: torch.Tensor | np.ndarray | Sequence[int],
    ks: Iterable[int] = (10,),
    metrics: Iterable[str] = METRICS,
) -> dict[str, torch.Tensor]:
    """Each metric for each row (float64), from target ranks: what paired significance tests need."""
    r = _as_tensor(ranks).double().reshape(-1)
    if r.numel() == 0:
        raise MLSA4RecError("cannot compute metrics over zero rows")
    out: dict[str, torch.Tensor] = {}
    names = [m.lower() for m in metrics]
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise MLSA4RecError(f"cutoffs K must be positive integers, got {ks}")
    for m in names:
        if m not in METRICS:
            raise MLSA4RecError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
    for k in sorted(set(ks)):
        hit = (r <= k).double()
        values = {
            "hit": hit,
            "recall": hit,
            "precision": hit / k,
            "ndcg": hit / torch.log2(r + 1.0),
            "mrr": hit / r,
        }
        for m in names:
            out[f"{m}@{k}"] = values[m]
    return out


def parse_metric(name: str) -> tuple[str, int]:
    """'ndcg@10' -> ('ndcg', 10), with one clear error for anything else."""
    metric, sep, k = name.lower().partition("@")
    if not sep or metric not in METRICS or not k.isdigit() or int(k) < 1:
        raise MLSA4RecError(f"metric {name!r} is not of the form NAME@K with NAME one of {', '.join(METRICS)} "
                            "and K a positive integer (e.g. ndcg@10)")
    return metric, int(k)


def metrics_from_ranks(
    ranks: torch.Tensor | np.ndarray | Sequence[int],
    ks: Iterable[int] = (10,),
    metrics: Iterable[str] = METRICS,
) -> dict[str, float]:
    """Mean of each metric over rows, from target ranks (see the module docstring)."""
    return {name: float(values.mean()) for name, values in per_user_metrics(ranks, ks, metrics).items()}


def ranking_metrics(
    scores: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray | Sequence[int],
    ks: Iterable[int] = (10,),
    metrics: Iterable[str] = METRICS,
) -> dict[str, float]:
    """HR/NDCG/MRR/Recall/Precision@K averaged over the rows of a users x items score matrix.

    >>> ranking_metrics([[0.1, 0.9, 0.3]], [2], ks=[1, 2])["hit@2"]
    1.0
    """
    return metrics_from_ranks(target_ranks(scores, targets), ks, metrics)
