"""Full ranking over every item for each user of the validation or test split.

Each user's target is ranked against all n_items real items (the padding column is -inf); items
the user has already seen stay in the ranking unless ``exclude_history`` is set (RecBole's
sequential default keeps them). With ``exclude_history`` every earlier item of the user except the
target itself is removed, so a repeated consumption can still be a hit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from mlsa4rec.data.dataset import SequenceData
from mlsa4rec.data.sampling import eval_batches, eval_order
from mlsa4rec.metrics import METRICS, metrics_from_ranks, target_ranks
from mlsa4rec.settings import TrainConfig


class Group(Protocol):
    """What the evaluator needs from a process group (``training.distributed.DistContext``)."""

    rank: int
    world_size: int

    def all_gather_array(self, array: np.ndarray) -> list[np.ndarray]: ...


def merge_round_robin(parts: list[np.ndarray], n: int, batch_size: int) -> np.ndarray:
    """Undo the round-robin split of ``n`` rows into batches of ``batch_size``: batch i was
    computed by rank i % len(parts), which returned its batches' rows back to back."""
    world = len(parts)
    out = np.empty(n, dtype=parts[0].dtype if parts else np.int64)
    used = [0] * world
    for i, lo in enumerate(range(0, n, batch_size)):
        r, size = i % world, min(batch_size, n - lo)
        out[lo:lo + size] = parts[r][used[r]:used[r] + size]
        used[r] += size
    if used != [len(p) for p in parts]:
        raise RuntimeError(f"ranks returned {[len(p) for p in parts]} rows, expected {used}")
    return out


def _mask_history(scores: torch.Tensor, data: SequenceData, targets: np.ndarray) -> None:
    """Set the scores of each row's earlier items to -inf, keeping the target's own score."""
    start = data.history_start(targets)
    n = targets - start
    rows = np.repeat(np.arange(len(targets)), n)
    flat = np.repeat(start - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(int(n.sum()))
    cols = torch.from_numpy(data.items[flat]).to(scores.device)
    t = torch.from_numpy(data.items[targets]).to(scores.device)
    keep = scores.gather(1, t[:, None])
    scores[torch.from_numpy(rows).to(scores.device), cols] = float("-inf")
    scores.scatter_(1, t[:, None], keep)


@torch.inference_mode()
def split_ranks(
    model: torch.nn.Module,
    data: SequenceData,
    split: str,
    max_seq_length: int,
    batch_size: int = 4096,
    exclude_history: bool = False,
    device: torch.device | str = "cpu",
    group: Group | None = None,
) -> np.ndarray:
    """Target rank (1-based, ties optimistic) of every user with a ``split`` target, in user order
    (a padding-invariant model scores the users sorted by history length, see ``eval_order``).

    With a ``group`` of several ranks, each rank scores every world_size-th batch (the same
    batches one process would build, so the same floats) and the ranks are gathered and put back
    in user order on every rank: each user is scored exactly once, nothing is padded.
    A progress bar shows on a terminal, on rank 0 only (as training's).
    """
    rank, world = (group.rank, group.world_size) if group is not None else (0, 1)
    was_training = model.training
    model.eval()
    trim = bool(getattr(model, "padding_invariant", False))
    targets_all = data.eval_targets(split)
    out = []
    n_batches = len(range(rank * batch_size, len(targets_all), batch_size * world))  # eval_batches' part
    bar = tqdm(total=n_batches, desc=split, leave=False, disable=None if rank == 0 else True, dynamic_ncols=True)
    try:
        for batch in eval_batches(data, split, max_seq_length, batch_size, trim=trim, part=(rank, world)):
            scores = model.full_sort_scores(batch.item_seq.to(device), batch.lengths.to(device)).float()
            if exclude_history:
                _mask_history(scores, data, targets_all[batch.rows])
            out.append(target_ranks(scores, batch.targets.to(device)).cpu())
            bar.update()
    finally:
        bar.close()
        model.train(was_training)
    local = torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)
    if world > 1:
        local = merge_round_robin(group.all_gather_array(local), len(targets_all), batch_size)
    ranks = np.empty_like(local)
    ranks[eval_order(data, split, max_seq_length, trim)] = local  # scoring order -> user order
    return ranks


def evaluate(
    model: torch.nn.Module,
    data: SequenceData,
    split: str,
    max_seq_length: int,
    ks: Iterable[int] = (5, 10),
    metrics: Iterable[str] = METRICS,
    batch_size: int = 4096,
    exclude_history: bool = False,
    device: torch.device | str = "cpu",
    group: Group | None = None,
) -> dict[str, float]:
    """Mean metrics over the users of ``split`` ('valid' or 'test')."""
    ranks = split_ranks(model, data, split, max_seq_length, batch_size, exclude_history, device, group)
    return metrics_from_ranks(ranks, ks, metrics)


def evaluate_split(model: torch.nn.Module, data: SequenceData, split: str, settings: TrainConfig,
                   device: torch.device | str = "cpu", group: Group | None = None) -> dict[str, float]:
    """``evaluate`` with every setting taken from a run's settings (``Config.train``)."""
    return evaluate(model, data, split, settings.max_seq_length, settings.topk, settings.metrics,
                    settings.eval_batch_size, settings.exclude_history, device, group)
