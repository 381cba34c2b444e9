"""Full ranking over a catalog of any size, one chunk of items at a time.

``rank_items(user, table, targets, chunk)`` gives what ``metrics.target_ranks`` gives for the
matrix ``user @ table.T`` (padding column -inf, excluded items -inf, the target kept), and
optionally each row's top k, without ever holding more than ``B x chunk`` scores:

* **rank** = 1 + the number of real items (ids 1..n) scored *strictly higher* than the target
  (the optimistic tie rule of ``metrics``); an item scored -inf (the padding row, an excluded item)
  never outranks it; a NaN score among the ranked items raises the ``MLSA4RecError`` that
  ``target_ranks`` raises. Excluded items are ``(rows, items)`` pairs (a user's history); a pair
  naming the row's own target is ignored, so a repeated item can still be a hit.
* **top k**: the k highest-scored real items over the whole catalog, best first; among equal
  scores the **lower item id comes first** (scores compare as floats, so -0.0 equals 0.0 and is
  returned as 0.0). ``k`` larger than the catalog is clamped to ``n_items``, as serving clamps it;
  when fewer than k items are left unexcluded, excluded items (score -inf) fill the tail in id
  order. The order is exact and deterministic: each score is packed with its id into one int64 key
  (order-preserving float bits, then the complemented id), so ``torch.topk`` over keys has no ties.

**Scores and exactness.** Scores are computed in the inputs' dtype and compared in float32, as the
evaluator compares ``full_sort_scores(...).float()``. When ``chunk >= n_items`` the catalog is one
chunk and the scores are exactly ``(user @ table.T).float()``, the product ``full_sort_scores``
computes, so ranks and top k are bit-for-bit those of the whole matrix. With smaller chunks each
chunk is its own matrix product, and a float32 product's last bit can depend on the shape of the
product it belongs to (the BLAS picks kernels and blockings by shape; measured with MKL on x86: none
of 1,024 x 12,102 scores differ for chunks of 1,000 or more items, thousands for chunks of 64, and a
lone user's matrix-vector product differs even at 4,093). So that every comparison is between two
numbers of the same product, each chunk's product also computes every target's score: the chunk's
rows and the B targets' rows are multiplied in one call, and the chunk's items are compared with
that call's target scores. The target's own column is never counted against it (where it rounds
above the target's score, the target would outrank itself: measured, a third of the ranks of a
random LRURec's lone users). Ranks can then differ from the whole matrix's only where an item and
the target are within a rounding error of each other, a tie at float32 precision either way (none
found on Beauty, ``docs/protocol.md``); integer-valued inputs (exact arithmetic) give identical
results for every chunk size (tested).

**Memory**: one chunk's scores, B x (chunk + B) float32 (B x (n_items + 1) for one chunk), and
comparisons made in row blocks of about 2^20 scores (a few MB); with ``k``, the running B x k keys.
``chunk`` is a width in items, not bytes: B x chunk x 4 bytes is 256 MB for 1,024 users and 65,536
items. Measured (1,024 users, 10^6 items, D = 64, one core of a shared 2-core AMD EPYC): about 0.3
GB above the inputs and 5 s with chunks of 65,536, against 12.7 GB and 26 to 72 s for the whole
matrix through ``metrics.target_ranks`` (its comparison's bool is summed through an int64 copy).

``rank_items_reference`` is the same contract on the whole matrix at once (``target_ranks`` and a
stable sort), for tests.

For serving, ``top_items(user, table, k, chunk, exclude=None, broken=None)`` is the top k alone (no
targets, no ranks) by the same chunks, keys and tie rule, with a check of every chunk for NaN or
+-inf scores; ``top_scores(scores, k, ids)`` applies the rule to a matrix already made (a row's
full scores, or an index's candidates with their ids).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.metrics import target_ranks

_HIGH, _LOW = 1 << 32, 0xFFFFFFFF  # a key is score bits * 2^32 + (2^32 - 1 - id): lower id = larger key
_BLOCK = 1 << 20  # elements per row block of a comparison (_block)
_NAN = "scores contain NaN; the model produced non-finite outputs"  # target_ranks' message


class Ranking(NamedTuple):
    """``ranks``: B int64, 1-based. ``top_ids`` (B x k int64) and ``top_scores`` (B x k float32):
    best first, lower id first among equal scores; None when no ``k`` was asked for."""

    ranks: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_scores: torch.Tensor | None = None


def _check(user: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, k: int | None,
           exclude: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, int | None, tuple | None]:
    if user.dim() != 2 or table.dim() != 2 or user.shape[1] != table.shape[1]:
        raise MLSA4RecError(f"user vectors must be B x D and the item table (n_items + 1) x D; got "
                            f"{tuple(user.shape)} and {tuple(table.shape)}")
    n = table.shape[0] - 1
    if n < 1:
        raise MLSA4RecError("the item table has no real item (row 0 is padding)")
    t = torch.as_tensor(targets).to(user.device, torch.long).reshape(-1)
    if t.shape[0] != user.shape[0]:
        raise MLSA4RecError(f"one target per row: {user.shape[0]} rows, {t.shape[0]} targets")
    if t.numel() and (int(t.min()) < 1 or int(t.max()) > n):
        raise MLSA4RecError(f"target ids must lie in [1, {n}] (0 is padding, never ranked)")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MLSA4RecError(f"k must be a positive integer, got {k!r}")
        k = min(k, n)
    pairs = None
    if exclude is not None:
        rows, items = (torch.as_tensor(x).to(user.device, torch.long).reshape(-1) for x in exclude)
        if rows.shape != items.shape:
            raise MLSA4RecError("excluded items are (rows, items) pairs of equal length")
        if rows.numel():
            if int(rows.min()) < 0 or int(rows.max()) >= t.shape[0] or int(items.min()) < 0 or int(items.max()) > n:
                raise MLSA4RecError(f"excluded pairs must name rows in [0, {t.shape[0] - 1}] and items in [0, {n}]")
            keep = items != t[rows]  # the target itself is never excluded
            rows, items = rows[keep], items[keep]
            items, order = torch.sort(items, stable=True)  # by id, so that a chunk's pairs are one slice
            pairs = (rows[order], items)
    return t, k, pairs


def _keys(scores: torch.Tensor, ids: torch.Tensor | int) -> torch.Tensor:
    """int64 keys ordering (score desc, id asc) as plain integers: float32 bits made monotone,
    then the complemented id. ``ids``: the items' ids (broadcast), or the first of consecutive ones."""
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0 (they compare equal)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip all but the sign bit
    if isinstance(ids, int):
        ids = torch.arange(ids, ids + scores.shape[1], device=scores.device)
    return ordered.long() * _HIGH + (_LOW - ids)


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.div(keys, _HIGH, rounding_mode="floor")
    ordered = high.int()
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return _LOW - (keys - high * _HIGH), bits.view(torch.float32)


def _block(width: int) -> int:
    """Rows per block of about _BLOCK elements: a comparison's bool (and the int64 copy that ``sum``
    makes of it) then takes a few MB, not B x chunk x 9 bytes (measured: 12.7 GB for the whole
    1,024 x 10^6 matrix through ``target_ranks``, 4 GB of it the scores)."""
    return max(1, _BLOCK // max(width, 1))


def _count(scores: torch.Tensor, bound: torch.Tensor, strict: bool = True) -> torch.Tensor:
    """Per row, how many entries are > ``bound`` (B x 1), or >= it when not ``strict``."""
    step, compare = _block(scores.shape[1]), torch.gt if strict else torch.ge
    return torch.cat([compare(scores[r:r + step], bound[r:r + step]).sum(dim=1)
                      for r in range(0, scores.shape[0], step)])


def _chunk_top(scores: torch.Tensor, first_id: int, k: int) -> torch.Tensor:
    """The keys of a chunk's k best items (ids first_id, first_id + 1, ...). ``torch.topk`` on the
    floats picks them unless the k-th score ties with one left out; those rows (rare with real
    scores, every row whose tail is -inf) are picked again by their keys."""
    k = min(k, scores.shape[1])
    step = _block(scores.shape[1])  # topk copies a strided view: by blocks
    values, index = (torch.cat(parts) for parts in zip(*(scores[r:r + step].topk(k, dim=1)
                                                          for r in range(0, scores.shape[0], step))))
    keys = _keys(values, index + first_id)
    tied = (_count(scores, values[:, -1:], strict=False) > k).nonzero().squeeze(1)
    for r in range(0, len(tied), step):
        rows = tied[r:r + step]
        keys[rows] = _keys(scores[rows], first_id).topk(k, dim=1).values
    return keys.sort(dim=1, descending=True).values


def _merge(best: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of the running keys and a chunk's, best first."""
    both = torch.cat([best, keys], dim=1)
    return both.topk(min(k, both.shape[1]), dim=1).values


@torch.no_grad()
def rank_items(
    user: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    k: int | None = None,
) -> Ranking:
    """Rank each row's target among the items of ``table`` (row 0 = padding, never ranked), walking
    the catalog ``chunk`` items at a time (the module docstring states the rules).

    ``user``: B x D; ``table``: (n_items + 1) x D, same dtype and device; ``targets``: B ids in
    1..n_items; ``exclude``: ``(rows, items)``, two equal-length id tensors, item ``items[i]`` left
    out of row ``rows[i]``'s ranking (never the row's target); ``k``: also return the top k.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise MLSA4RecError(f"chunk must be a positive number of items, got {chunk!r}")
    t, k, pairs = _check(user, table, targets, k, exclude)
    n, batch = table.shape[0] - 1, user.shape[0]
    device = user.device
    if batch == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Ranking(empty) if k is None else Ranking(empty, empty.view(0, k), torch.zeros(0, k, device=device))
    counts = torch.zeros(batch, dtype=torch.long, device=device)
    best = torch.empty(batch, 0, dtype=torch.long, device=device)
    one = chunk >= n
    # one chunk: the whole table in one product, padding row included, as full_sort_scores;
    # several: real items only, [1, 1 + chunk), [1 + chunk, 1 + 2 chunk), ...
    bounds = [(0, n + 1)] if one else [(lo, min(lo + chunk, n + 1)) for lo in range(1, n + 1, chunk)]
    target_rows = None if one else table[t]
    for lo, hi in bounds:
        if one:
            scores = (user @ table.t()).float()
        else:  # the chunk's items and every target in one product (module docstring)
            scores = (user @ torch.cat([table[lo:hi], target_rows]).t()).float()
        width = hi - lo
        if lo == 0:
            scores[:, 0] = float("-inf")
        if pairs is not None:
            first, last = torch.searchsorted(pairs[1], torch.tensor([lo, hi], device=device)).tolist()
            scores[pairs[0][first:last], pairs[1][first:last] - lo] = float("-inf")
        if torch.isnan(scores.amax(dim=1)).any():  # amax propagates NaN, without a B x chunk bool
            raise MLSA4RecError(_NAN)
        if one:
            own = scores.gather(1, t[:, None])
        else:  # a copy: a view would keep this chunk's scores alive through the next product
            own = scores[:, width:].diagonal()[:, None].clone()
            scores = scores[:, :width]
        counts += _count(scores, own)
        inside = ((t >= lo) & (t < hi)).nonzero().squeeze(1)
        if inside.numel():  # the target's own column is not a competitor (it may round apart from own)
            counts[inside] -= (scores[inside, t[inside] - lo] > own[inside, 0]).long()
        if k is not None:
            best = _merge(best, _chunk_top(scores[:, 1:] if lo == 0 else scores, max(lo, 1), k), k)
        del scores
    ranks = counts + 1
    if k is None:
        return Ranking(ranks)
    ids, values = _decode(best)
    return Ranking(ranks, ids, values)


@torch.no_grad()
def rank_items_reference(
    user: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    k: int | None = None,
) -> Ranking:
    """``rank_items`` on the whole B x (n_items + 1) matrix at once: ``metrics.target_ranks`` for
    the ranks, a stable descending sort for the top k. For tests; memory grows with the catalog."""
    t, k, pairs = _check(user, table, targets, k, exclude)
    scores = (user @ table.t()).float()
    scores[:, 0] = float("-inf")
    if pairs is not None:
        scores[pairs[0], pairs[1]] = float("-inf")
    ranks = target_ranks(scores, t)
    if k is None:
        return Ranking(ranks)
    values, index = torch.sort(scores[:, 1:], dim=1, descending=True, stable=True)
    return Ranking(ranks, index[:, :k] + 1, values[:, :k] + 0.0)


def top_scores(scores: torch.Tensor, k: int, ids: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row of the B x W matrix ``scores`` (compared in float32), by the
    tie rule above (higher score first, then the lower id): B x min(k, W) ids and scores, best
    first. Column j is item ``ids + j`` for an int, else item ``ids[b, j]`` (a B x W id tensor,
    e.g. an index's candidates). What ``top_items`` does within one chunk, for a matrix already made."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MLSA4RecError(f"k must be a positive integer, got {k!r}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        width = min(k, scores.shape[1])
        return (torch.zeros(scores.shape[0], width, dtype=torch.long, device=scores.device),
                torch.zeros(scores.shape[0], width, device=scores.device))
    if isinstance(ids, torch.Tensor):
        keys = _keys(scores.float(), ids.to(scores.device, torch.long)).topk(min(k, scores.shape[1]), dim=1).values
    else:
        keys = _chunk_top(scores.float(), ids, k)
    return _decode(keys)


@torch.no_grad()
def top_items(
    user: torch.Tensor,
    table: torch.Tensor,
    k: int,
    chunk: int,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    broken: Callable[[int], Exception] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best real items of ``user @ table.T`` (row 0 of ``table`` is padding, never
    returned), walking the catalog ``chunk`` items at a time: B x min(k, n_items) ids and float32
    scores, best first, by ``rank_items``' top-k rules (the lower id first among equal scores;
    excluded items, scored -inf, fill the tail when fewer than k are left). No target, no ranks:
    what serving asks for. Memory: one chunk's B x chunk scores and the running B x k keys.

    ``exclude``: ``(rows, items)``, item ``items[i]`` left out of row ``rows[i]``. ``broken``: called
    with the first row (of the first chunk that has one) whose real items score NaN or +-inf, before
    the exclusions apply, to make the exception raised; without it only NaN raises, as in
    ``rank_items``. With ``chunk >= n_items`` the scores are exactly ``(user @ table.T).float()``, the
    product ``full_sort_scores`` computes; narrower chunks are products of their own, whose last bit
    may differ (module docstring).
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise MLSA4RecError(f"chunk must be a positive number of items, got {chunk!r}")
    if user.dim() != 2 or table.dim() != 2 or user.shape[1] != table.shape[1]:
        raise MLSA4RecError(f"user vectors must be B x D and the item table (n_items + 1) x D; got "
                            f"{tuple(user.shape)} and {tuple(table.shape)}")
    n, batch, device = table.shape[0] - 1, user.shape[0], user.device
    if n < 1:
        raise MLSA4RecError("the item table has no real item (row 0 is padding)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MLSA4RecError(f"k must be a positive integer, got {k!r}")
    k = min(k, n)
    if batch == 0:
        return torch.zeros(0, k, dtype=torch.long, device=device), torch.zeros(0, k, device=device)
    pairs = None
    if exclude is not None:
        rows, items = (torch.as_tensor(x).to(device, torch.long).reshape(-1) for x in exclude)
        if rows.shape != items.shape:
            raise MLSA4RecError("excluded items are (rows, items) pairs of equal length")
        if rows.numel():
            if int(rows.min()) < 0 or int(rows.max()) >= batch or int(items.min()) < 0 or int(items.max()) > n:
                raise MLSA4RecError(f"excluded pairs must name rows in [0, {batch - 1}] and items in [0, {n}]")
            items, order = torch.sort(items, stable=True)  # by id, so that a chunk's pairs are one slice
            pairs = (rows[order], items)
    best = torch.empty(batch, 0, dtype=torch.long, device=device)
    # one chunk: the whole table in one product, padding row included, as full_sort_scores
    bounds = [(0, n + 1)] if chunk >= n else [(lo, min(lo + chunk, n + 1)) for lo in range(1, n + 1, chunk)]
    for lo, hi in bounds:
        scores = (user @ table[lo:hi].t()).float()
        real = scores[:, 1:] if lo == 0 else scores
        high, low = real.amax(dim=1), real.amin(dim=1)  # NaN propagates to both; no B x chunk bool
        if broken is not None:
            bad = ~(torch.isfinite(high) & torch.isfinite(low))
            if bool(bad.any()):
                raise broken(int(bad.nonzero()[0]))
        elif bool(torch.isnan(high).any()):
            raise MLSA4RecError(_NAN)
        if lo == 0:
            scores[:, 0] = float("-inf")
        if pairs is not None:
            first, last = torch.searchsorted(pairs[1], torch.tensor([lo, hi], device=device)).tolist()
            scores[pairs[0][first:last], pairs[1][first:last] - lo] = float("-inf")
        best = _merge(best, _chunk_top(real, max(lo, 1), k), k)
        del scores, real
    ids, values = _decode(best)
    return ids, values
