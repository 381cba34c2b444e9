"""The evaluator ranks each user's target over all items, with history kept or excluded."""

from __future__ import annotations

import numpy as np
import torch

from mlsa4rec.data.dataset import build_sequences
from mlsa4rec.data.readers import Interactions
from mlsa4rec.evaluation import split_ranks
from mlsa4rec.models.base import SequentialRecommender


class Fixed(SequentialRecommender):
    """Scores item i as i (so the highest id ranks first), whatever the history."""

    padding_invariant = True

    def __init__(self, n_items: int) -> None:
        super().__init__()
        self.n_items = n_items
        self.item_embedding = torch.nn.Embedding(n_items + 1, 1)
        self.item_embedding.weight.data = torch.arange(n_items + 1, dtype=torch.float32)[:, None]

    def encode(self, item_seq, lengths):
        return torch.ones(item_seq.shape[0], item_seq.shape[1], 1)


def test_ranks_with_and_without_history() -> None:
    # one user, items in order: 5 4 1 2 3 -> ids by first appearance: 5->1, 4->2, 1->3, 2->4, 3->5
    data = build_sequences(Interactions(np.zeros(5, int), np.array([5, 4, 1, 2, 3]), np.arange(5.0)),
                           "t", "[0,inf)", "[0,inf)")
    model = Fixed(data.n_items)
    # test target = id 5 (highest score): rank 1; valid target = id 4: rank 2 (id 5 above it)
    assert split_ranks(model, data, "test", 10).tolist() == [1]
    assert split_ranks(model, data, "valid", 10).tolist() == [2]
    # excluding history removes nothing above id 4 for valid (id 5 is not yet seen) ...
    assert split_ranks(model, data, "valid", 10, exclude_history=True).tolist() == [2]


def test_exclude_history_keeps_a_repeated_target() -> None:
    # items 1 2 3 4 3 -> target 3 was seen before; excluding history must not hide it
    data = build_sequences(Interactions(np.zeros(5, int), np.array([1, 2, 3, 4, 3]), np.arange(5.0)),
                           "t", "[0,inf)", "[0,inf)")
    model = Fixed(data.n_items)
    assert split_ranks(model, data, "test", 10).tolist() == [2]            # id 4 scores higher
    assert split_ranks(model, data, "test", 10, exclude_history=True).tolist() == [1]  # id 4 seen: removed


def test_length_sorted_scoring_returns_ranks_in_user_order() -> None:
    """A padding-invariant model is scored in length-sorted, trimmed batches; the ranks come back
    in user order, equal to scoring every user padded to L."""
    from mlsa4rec.models import create

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 20, size=30)
    users = np.repeat(np.arange(30), lengths)
    items = rng.integers(1, 40, size=users.shape[0])
    data = build_sequences(Interactions(users, items, np.arange(users.shape[0], dtype=float)), "t",
                           "[0,inf)", "[0,inf)")
    torch.manual_seed(0)
    model = create("mamba4rec", data.n_items, hidden_size=8, d_state=4)
    sorted_ranks = split_ranks(model, data, "test", 12, batch_size=7)
    sorted_excluded = split_ranks(model, data, "test", 12, batch_size=7, exclude_history=True)
    assert (sorted_excluded <= sorted_ranks).all() and (sorted_excluded < sorted_ranks).any()
    model.padding_invariant = False
    assert sorted_ranks.tolist() == split_ranks(model, data, "test", 12, batch_size=7).tolist()
    assert sorted_excluded.tolist() == split_ranks(model, data, "test", 12, batch_size=7, exclude_history=True).tolist()
