"""Chunked full ranking (ops.ranking.rank_items) against the whole matrix at once: ranks and top k."""

from __future__ import annotations

import pytest
import torch

from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.metrics import target_ranks
from mlsa4rec.ops.ranking import _decode, _keys, rank_items, rank_items_reference


def integer_case(seed: int, batch: int = 13, n: int = 50, dim: int = 4, n_excluded: int = 60):
    """Small integer values: every dot product is exact in float32 whatever the summation order, so
    any chunking must give bit-identical scores, and ties are everywhere. Item 5 scores -inf and
    item 9 +inf for every user; some excluded pairs name the row's own target."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(-2, 3, (batch, dim), generator=g).float()
    table = torch.randint(-2, 3, (n + 1, dim), generator=g).float()
    user[:, 0] = 1.0
    table[5], table[9] = 0.0, 0.0
    table[5, 0], table[9, 0] = float("-inf"), float("inf")
    targets = torch.randint(1, n + 1, (batch,), generator=g)
    rows = torch.randint(0, batch, (n_excluded,), generator=g)
    items = torch.randint(0, n + 1, (n_excluded,), generator=g)
    rows, items = torch.cat([rows, torch.arange(3)]), torch.cat([items, targets[:3]])  # targets: never excluded
    return user, table, targets, (rows, items)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 2, 7, 49, 50, 51, 10_000])  # 50 items: uneven, exact, one chunk
def test_chunks_equal_the_whole_matrix(seed: int, chunk: int) -> None:
    user, table, targets, exclude = integer_case(seed)
    for excluded in (None, exclude):
        for k in (None, 1, 10, 50, 1000):  # k > n_items is clamped to n_items
            got = rank_items(user, table, targets, chunk, excluded, k=k)
            want = rank_items_reference(user, table, targets, excluded, k=k)
            assert torch.equal(got.ranks, want.ranks)
            if k is None:
                assert got.top_ids is None and want.top_ids is None
            else:
                assert got.top_ids.shape == (13, min(k, 50))
                assert torch.equal(got.top_ids, want.top_ids) and torch.equal(got.top_scores, want.top_scores)


def test_reference_is_target_ranks_and_the_tie_rule() -> None:
    user, table, targets, exclude = integer_case(3)
    scores = (user @ table.t()).float()
    scores[:, 0] = float("-inf")
    ref = rank_items_reference(user, table, targets, k=50)
    assert torch.equal(ref.ranks, target_ranks(scores, targets))
    assert (ref.top_ids[:, 0] == 9).all() and (ref.top_ids[:, -1] == 5).all()  # +inf first, -inf last
    assert not (ref.top_ids == 0).any()  # padding is never ranked
    for row in range(13):  # best first; among equal scores the lower id first
        ids, values = ref.top_ids[row].tolist(), ref.top_scores[row].tolist()
        assert all((a > b) or (a == b and i < j) for a, b, i, j in zip(values, values[1:], ids, ids[1:]))
    # an excluded item drops to -inf: it leaves the ranking and falls to the tail of the top k
    excluded = rank_items(user, table, targets, 7, exclude, k=50)
    rows, items = exclude
    row, item = next((int(r), int(i)) for r, i in zip(rows, items) if i > 0 and i != targets[r] and i not in (5, 9))
    assert float(excluded.top_scores[row][excluded.top_ids[row] == item]) == float("-inf")


def test_exact_ties_count_only_strictly_higher() -> None:
    user = torch.ones(2, 1)
    table = torch.tensor([[0.0], [1.0], [1.0], [1.0], [2.0]])
    got = rank_items(user, table, torch.tensor([2, 4]), 2, k=3)
    assert got.ranks.tolist() == [2, 1]  # item 2 ties with 1 and 3: only item 4 is above it
    assert got.top_ids.tolist() == [[4, 1, 2], [4, 1, 2]] and got.top_scores.tolist() == [[2.0, 1.0, 1.0]] * 2


def test_float_scores_one_chunk_is_the_whole_product() -> None:
    """Real-valued scores: a chunk as wide as the catalog is the product full_sort_scores computes,
    so ranks and top k are bit-identical; narrower chunks agree on these data too."""
    g = torch.Generator().manual_seed(0)
    user, table = torch.randn(64, 16, generator=g), torch.randn(3001, 16, generator=g) * 0.1
    targets = torch.randint(1, 3001, (64,), generator=g)
    want = rank_items_reference(user, table, targets, k=20)
    for chunk in (3000, 100_000, 1000, 777):
        got = rank_items(user, table, targets, chunk, k=20)
        assert torch.equal(got.ranks, want.ranks) and torch.equal(got.top_ids, want.top_ids)
        assert torch.equal(got.top_scores, want.top_scores)


def test_half_precision_inputs_compare_in_float32() -> None:
    g = torch.Generator().manual_seed(1)
    user, table = torch.randn(8, 8, generator=g).bfloat16(), torch.randn(101, 8, generator=g).bfloat16()
    targets = torch.randint(1, 101, (8,), generator=g)
    scores = (user @ table.t()).float()
    scores[:, 0] = float("-inf")
    assert torch.equal(rank_items(user, table, targets, 1000).ranks, target_ranks(scores, targets))


def test_keys_order_scores_then_lower_ids() -> None:
    values = torch.tensor([[0.0, -0.0, 1.5, -1.5, float("inf"), float("-inf"), 1e-45, -1e-45, 3.0e38, 0.0]])
    keys = _keys(values, 1)
    order = keys.argsort(dim=1, descending=True)
    want = torch.sort(values, dim=1, descending=True, stable=True).indices
    assert torch.equal(order, want)
    ids, decoded = _decode(keys)
    assert ids.tolist() == [list(range(1, 11))] and torch.equal(decoded, values + 0.0)


def test_nan_raises_like_target_ranks() -> None:
    user, table, targets, _ = integer_case(0)
    table[20, 1] = float("nan")
    for chunk in (1, 7, 1000):
        with pytest.raises(MLSA4RecError, match="NaN"):
            rank_items(user, table, targets, chunk)
    with pytest.raises(MLSA4RecError, match="NaN"):
        rank_items_reference(user, table, targets)
    # a NaN only in an excluded item is masked first, as the evaluator masks history before ranking
    keep = targets != 20
    user, targets = user[keep], targets[keep]
    everywhere = (torch.arange(len(targets)), torch.full((len(targets),), 20))
    got = rank_items(user, table, targets, 7, everywhere)
    assert torch.equal(got.ranks, rank_items_reference(user, table, targets, everywhere).ranks)


@pytest.mark.parametrize(("args", "needle"), [
    (dict(chunk=0), "chunk"), (dict(chunk=True), "chunk"), (dict(k=0), "k must"),
    (dict(targets=torch.zeros(13, dtype=torch.long)), r"\[1, 50\]"),
    (dict(targets=torch.ones(3, dtype=torch.long)), "one target per row"),
    (dict(exclude=(torch.tensor([0]), torch.tensor([51]))), "excluded pairs"),
    (dict(exclude=(torch.tensor([0, 1]), torch.tensor([1]))), "equal length"),
])
def test_bad_arguments_are_refused(args: dict, needle: str) -> None:
    user, table, targets, _ = integer_case(0)
    kwargs = {"user": user, "table": table, "targets": targets, "chunk": 7, **args}
    with pytest.raises(MLSA4RecError, match=needle):
        rank_items(**kwargs)
