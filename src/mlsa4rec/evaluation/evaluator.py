"""Full ranking over every item for each user of the validation or test split.

Each user's target is ranked against all n_items real items (the padding column is -inf); items
the user has already seen stay in the ranking unless ``exclude_history`` is set (RecBole's
sequential default keeps them). With ``exclude_history`` every earlier item of the user except the
target itself is removed, so a repeated consumption can still be a hit.

A model whose scores are ``forward(...) @ item_table().T`` (every model built on
``SequentialRecommender`` that keeps its ``full_sort_scores``) is ranked by ``ops.ranking.rank_items``,
``item_chunk`` items at a time, so a catalog of millions of items never needs a users x items
matrix: the ranks are exactly those of ``full_sort_scores`` when the catalog fits in one chunk (the
default 65,536 items: every dataset of this repository), and differ at most where an item and the
target tie at float32 precision otherwise (``ops/ranking.py``). Any other model is scored by its own
``full_sort_scores``, the whole matrix at once.

``sampled_split_ranks`` is **not** the protocol: each target against M sampled negatives, for a
quick look at a large catalog (``docs/protocol.md``; Krichene & Rendle 2020).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from mlsa4rec.data.dataset import SequenceData
from mlsa4rec.data.sampling import cloze_uniforms, eval_batches, eval_order
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.metrics import METRICS, metrics_from_ranks, target_ranks
from mlsa4rec.models.base import SequentialRecommender
from mlsa4rec.ops.ranking import rank_items
from mlsa4rec.settings import TrainConfig

DEFAULT_ITEM_CHUNK: int = TrainConfig.eval_item_chunk  # the setting's default (a dataclass class attribute)
# positions one forward call of evaluation holds on a CPU: a batch of 1,024 histories of 200 items
# leaves the caches (Mamba's scan alone holds B x L x 2D x N floats); in pieces of this size a
# validation pass on ML-1M took 2.3x less time for the causal MLSA4Rec at L = 200, 2.1x Mamba4Rec,
# 1.7x SASRec, 1.5x the causal MLSA4Rec at L = 50 (docs/results/eval_forward_tokens.md)
CPU_FORWARD_TOKENS = 16384


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


def history_pairs(data: SequenceData, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, items): every earlier item of each row's user (the whole history, not only the last L),
    the target's own id included where it repeats (the callers keep the target)."""
    start = data.history_start(targets)
    n = targets - start
    rows = np.repeat(np.arange(len(targets)), n)
    flat = np.repeat(start - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(int(n.sum()))
    return rows, data.items[flat]


def _mask_history(scores: torch.Tensor, data: SequenceData, targets: np.ndarray) -> None:
    """Set the scores of each row's earlier items to -inf, keeping the target's own score."""
    rows, items = history_pairs(data, targets)
    cols = torch.from_numpy(items).to(scores.device)
    t = torch.from_numpy(data.items[targets]).to(scores.device)
    keep = scores.gather(1, t[:, None])
    scores[torch.from_numpy(rows).to(scores.device), cols] = float("-inf")
    scores.scatter_(1, t[:, None], keep)


def forward_tokens(model: torch.nn.Module, device: torch.device | str) -> int | None:
    """The positions per forward call of evaluation: ``CPU_FORWARD_TOKENS`` on a CPU, no limit on
    a GPU (faster the larger the batch) or for a model that is not padding-invariant (the faithful
    MLSA4Rec orders a batch's rows by length itself and skips their padding: measured 0.78x in
    pieces, which hold fewer rows of alike length)."""
    cpu = torch.device(device).type == "cpu"
    return CPU_FORWARD_TOKENS if cpu and getattr(model, "padding_invariant", False) else None


def in_pieces(fn, seq: torch.Tensor, lengths: torch.Tensor, tokens: int | None) -> torch.Tensor:
    """``fn(seq, lengths)`` (a model's forward or full_sort_scores) on a few rows at a time, at most
    ``tokens`` positions a call (or one row), the rows shared out evenly. Each row's output depends
    on that row alone; only the floats' rounding may differ from one call on the whole batch, as it
    does between two ``eval_batch_size`` (the kernels sum in an order that can depend on the number
    of rows). Tested for every model: outputs within 1e-6, the same ranks; on the study's real
    validation splits every rank was the same (``benchmarks/eval_forward_tokens.py`` checks it)."""
    rows = max(1, tokens // max(seq.shape[1], 1)) if tokens else seq.shape[0]
    pieces = -(-seq.shape[0] // rows)
    if pieces <= 1:
        return fn(seq, lengths)
    return torch.cat([fn(s, n) for s, n in zip(seq.tensor_split(pieces), lengths.tensor_split(pieces))])


def scores_are_dot_products(model: torch.nn.Module) -> bool:
    """Whether ``model.full_sort_scores`` is ``SequentialRecommender``'s: ``forward(...) @
    item_table().T`` with the padding column -inf, which ``rank_items`` computes chunk by chunk.
    A model that overrides ``full_sort_scores`` (or is not a ``SequentialRecommender``) is scored
    by its own method instead."""
    return (isinstance(model, SequentialRecommender)
            and type(model).full_sort_scores is SequentialRecommender.full_sort_scores)


def evaluation_bytes(batch_size: int, columns: int, item_chunk: int = DEFAULT_ITEM_CHUNK) -> int:
    """A floor of what scoring one evaluation batch holds: its rows of float32 scores over one
    chunk of ``item_chunk`` items (0: the whole catalog of ``columns``), for the run's memory check."""
    return batch_size * min(columns, item_chunk or columns) * 4


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
    item_chunk: int = DEFAULT_ITEM_CHUNK,
    tokens_per_call: int | None = None,
) -> np.ndarray:
    """Target rank (1-based, ties optimistic) of every user with a ``split`` target, in user order
    (a padding-invariant model scores the users sorted by history length, see ``eval_order``).

    With a ``group`` of several ranks, each rank scores every world_size-th batch (the same
    batches one process would build, so the same floats) and the ranks are gathered and put back
    in user order on every rank: each user is scored exactly once, nothing is padded.
    A progress bar shows on a terminal, on rank 0 only (as training's).

    ``item_chunk`` (the setting ``eval_item_chunk``): items scored at once, so at most
    ``batch_size x (item_chunk + batch_size)`` float32 scores exist at a time (260 MB at 1,024 x
    65,536; the extra columns are the targets' scores, ``ops/ranking.py``); a catalog of
    at most ``item_chunk`` items (or any catalog, with 0) is one product, exactly the computation of
    ``full_sort_scores``. A fixed width rather than a rule from the batch size, so that the numbers
    do not depend on how many users a batch (or the last batch) holds. Models whose scores are not
    ``forward @ item_table().T`` ignore it (module docstring).

    The model runs on at most ``forward_tokens(model, device)`` positions a call (``in_pieces``: faster on a
    CPU, the same numbers up to float rounding); ``tokens_per_call`` sets another bound (0: none),
    for the benchmark that measured it.
    """
    if isinstance(item_chunk, bool) or not isinstance(item_chunk, int) or item_chunk < 0:
        raise MLSA4RecError(f"eval_item_chunk must be a whole number of items >= 0 (0 = the whole catalog at once), "
                            f"got {item_chunk!r}")
    rank, world = (group.rank, group.world_size) if group is not None else (0, 1)
    was_training = model.training
    model.eval()
    trim = bool(getattr(model, "padding_invariant", False))
    targets_all = data.eval_targets(split)
    out = []
    n_batches = len(range(rank * batch_size, len(targets_all), batch_size * world))  # eval_batches' part
    bar = tqdm(total=n_batches, desc=split, leave=False, disable=None if rank == 0 else True, dynamic_ncols=True)
    tokens = forward_tokens(model, device) if tokens_per_call is None else tokens_per_call or None
    try:
        table = model.item_table() if scores_are_dot_products(model) else None
        chunk = item_chunk or data.n_items
        for batch in eval_batches(data, split, max_seq_length, batch_size, trim=trim, part=(rank, world)):
            seq, lengths, targets = batch.item_seq.to(device), batch.lengths.to(device), batch.targets.to(device)
            if table is not None:  # forward @ item_table().T, item_chunk items at a time
                exclude = None
                if exclude_history:
                    rows, items = history_pairs(data, targets_all[batch.rows])
                    exclude = (torch.from_numpy(rows), torch.from_numpy(items))
                user = in_pieces(model, seq, lengths, tokens)  # B x D
                out.append(rank_items(user, table, targets, chunk, exclude).ranks.cpu())
            else:  # the model's own scores, the whole matrix at once
                scores = in_pieces(model.full_sort_scores, seq, lengths, tokens).float()
                if exclude_history:
                    _mask_history(scores, data, targets_all[batch.rows])
                out.append(target_ranks(scores, targets).cpu())
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
    item_chunk: int = DEFAULT_ITEM_CHUNK,
) -> dict[str, float]:
    """Mean metrics over the users of ``split`` ('valid' or 'test')."""
    ranks = split_ranks(model, data, split, max_seq_length, batch_size, exclude_history, device, group, item_chunk)
    return metrics_from_ranks(ranks, ks, metrics)


def evaluate_split(model: torch.nn.Module, data: SequenceData, split: str, settings: TrainConfig,
                   device: torch.device | str = "cpu", group: Group | None = None) -> dict[str, float]:
    """``evaluate`` with every setting taken from a run's settings (``Config.train``)."""
    return evaluate(model, data, split, settings.max_seq_length, settings.topk, settings.metrics,
                    settings.eval_batch_size, settings.exclude_history, device, group, settings.eval_item_chunk)


# --- sampled candidates: NOT the protocol --------------------------------------------------------

CANDIDATE_SAMPLERS = ("uniform", "popularity")
SAMPLED_WARNING = ("{label}* metrics rank each target against {n} sampled negatives ({sampler}), NOT among all items: "
                   "they are not the full-ranking protocol and not comparable with full-ranking metrics or published "
                   "tables; even the order of two models can flip (Krichene & Rendle 2020, 'On Sampled Metrics for "
                   "Item Recommendation', KDD)")
_SPLIT_KEYS = {"valid": 1, "test": 2}
_MAX_DRAWS = 1 << 20  # draws per user at most (the counter space of the uniforms)


def sampled_label(n_candidates: int, sampler: str = "uniform") -> str:
    """The prefix of every sampled metric's name: ``sampled100_`` (uniform), ``sampled100pop_``."""
    return f"sampled{n_candidates}{'' if sampler == 'uniform' else 'pop'}_"


def sample_negatives(data: SequenceData, targets: np.ndarray, n_candidates: int, sampler: str = "uniform",
                     seed: int = 0, split: str = "test", exclude_history: bool = False,
                     popularity: np.ndarray | None = None) -> np.ndarray:
    """len(targets) x n_candidates distinct negative item ids for the targets ``targets`` (flat
    indices, as ``eval_targets``): never the target, never an item the user saw before it when
    ``exclude_history``; drawn uniformly over 1..n_items or in proportion to the events training saw
    (``popularity``, by default ``data.training_counts()``, the counts of ``items.json``), without
    replacement (draws with replacement, repeats and banned items rejected, in draw order).

    The draws of a user are a pure function of (seed, split, user) - splitmix64 uniforms, as the
    cloze masks - so they do not depend on the batch size or on which other users are drawn."""
    if sampler not in CANDIDATE_SAMPLERS:
        raise MLSA4RecError(f"candidate sampler must be one of {', '.join(CANDIDATE_SAMPLERS)}, got {sampler!r}")
    n_items = data.n_items
    targets = np.asarray(targets, dtype=np.int64)
    batch = len(targets)
    users = (np.searchsorted(data.offsets, targets, side="right") - 1).astype(np.int64)
    weights = np.ones(n_items + 1) if sampler == "uniform" else (
        popularity if popularity is not None else data.training_counts()).astype(np.float64)
    weights[0] = 0.0
    rows, items = history_pairs(data, targets) if exclude_history else (np.zeros(0, np.int64),) * 2
    banned = np.unique(np.concatenate([np.arange(batch) * (n_items + 1) + data.items[targets],
                                       rows * (n_items + 1) + items]))
    positive = weights > 0
    eligible = int(positive.sum()) - np.bincount(banned // (n_items + 1), minlength=batch,
                                                 weights=positive[banned % (n_items + 1)].astype(np.float64))
    if batch == 0:
        return np.zeros((0, n_candidates), dtype=np.int64)
    if int(eligible.min()) < n_candidates:
        raise MLSA4RecError(f"a user has only {int(eligible.min())} items to draw {n_candidates} negatives from "
                            f"({sampler} sampler{', history excluded' if exclude_history else ''}); ask for fewer")
    cdf = np.cumsum(weights[1:]) / weights.sum()
    last = int(np.flatnonzero(weights[1:])[-1])  # the last item of weight > 0: cdf's rounding never picks past it
    out = np.zeros((batch, n_candidates), dtype=np.int64)
    pending = np.arange(batch)
    width = 2 * n_candidates + 16
    key = (int(seed) * 4 + _SPLIT_KEYS[split]) % (1 << 64)
    while pending.size:
        u = cloze_uniforms(key, users[pending], width)
        drawn = np.minimum(np.searchsorted(cdf, u, side="right"), last) + 1   # ids 1..n_items of weight > 0
        order = np.argsort(drawn, axis=1, kind="stable")
        sorted_ = np.take_along_axis(drawn, order, axis=1)
        repeat_sorted = np.zeros_like(sorted_, dtype=bool)
        repeat_sorted[:, 1:] = sorted_[:, 1:] == sorted_[:, :-1]   # a later draw of the same item
        repeat = np.empty_like(repeat_sorted)
        np.put_along_axis(repeat, order, repeat_sorted, axis=1)
        ok = ~repeat & ~np.isin(pending[:, None] * (n_items + 1) + drawn, banned)
        taken = ok & (np.cumsum(ok, axis=1) <= n_candidates)
        done = taken.sum(axis=1) == n_candidates
        out[pending[done]] = drawn[done][taken[done]].reshape(-1, n_candidates)
        pending = pending[~done]
        if pending.size and width >= _MAX_DRAWS:
            raise MLSA4RecError(f"could not draw {n_candidates} distinct negatives in {_MAX_DRAWS} draws for "
                                f"{pending.size} user(s); ask for fewer")
        width = min(2 * width, _MAX_DRAWS)
    return out


@torch.inference_mode()
def sampled_split_ranks(
    model: torch.nn.Module,
    data: SequenceData,
    split: str,
    max_seq_length: int,
    n_candidates: int,
    sampler: str = "uniform",
    seed: int = 0,
    exclude_history: bool = False,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """NOT the protocol: each target's 1-based rank among itself and ``n_candidates`` sampled
    negatives (``sample_negatives``; 1 + the negatives scored strictly higher), in user order.

    For a quick look at a catalog too large to rank in full often. Sampled metrics are not
    full-ranking metrics: they are not comparable with them, nor with published tables, and may
    even order two models differently (Krichene & Rendle 2020)."""
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) or n_candidates < 1:
        raise MLSA4RecError(f"the number of sampled candidates must be a positive integer, got {n_candidates!r}")
    was_training = model.training
    model.eval()
    trim = bool(getattr(model, "padding_invariant", False))
    targets_all = data.eval_targets(split)
    popularity = data.training_counts() if sampler == "popularity" else None
    table = model.item_table() if scores_are_dot_products(model) else None
    tokens = forward_tokens(model, device)
    out = []
    try:
        for batch in eval_batches(data, split, max_seq_length, batch_size, trim=trim):
            negatives = sample_negatives(data, targets_all[batch.rows], n_candidates, sampler, seed, split,
                                         exclude_history, popularity)
            seq, lengths = batch.item_seq.to(device), batch.lengths.to(device)
            candidates = torch.cat([batch.targets[:, None], torch.from_numpy(negatives)], dim=1).to(device)
            if table is not None:  # the target and its negatives in one product per user
                user = in_pieces(model, seq, lengths, tokens)  # B x D
                scores = (table[candidates] @ user[:, :, None]).squeeze(-1).float()
            else:
                scores = in_pieces(model.full_sort_scores, seq, lengths, tokens).float().gather(1, candidates)
            if torch.isnan(scores).any():
                raise MLSA4RecError("scores contain NaN; the model produced non-finite outputs")
            out.append(((scores[:, 1:] > scores[:, :1]).sum(dim=1) + 1).cpu())
    finally:
        model.train(was_training)
    local = torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)
    ranks = np.empty_like(local)
    ranks[eval_order(data, split, max_seq_length, trim)] = local
    return ranks


def evaluate_sampled(model: torch.nn.Module, data: SequenceData, split: str, settings: TrainConfig,
                     n_candidates: int, sampler: str = "uniform", seed: int = 0,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """NOT the protocol: mean metrics of ``sampled_split_ranks`` under a run's settings, every name
    prefixed by ``sampled_label`` (``sampled100_hit@10``) so that it cannot pass for a full-ranking
    number; ``exclude_history`` also keeps the user's history out of the negatives."""
    ranks = sampled_split_ranks(model, data, split, settings.max_seq_length, n_candidates, sampler, seed,
                                settings.exclude_history, settings.eval_batch_size, device)
    label = sampled_label(n_candidates, sampler)
    return {label + name: value for name, value in metrics_from_ranks(ranks, settings.topk, settings.metrics).items()}
