"""Samplers against brute-force constructions of the protocol's samples."""

from __future__ import annotations

import numpy as np
import pytest

from mlsa4rec.data.dataset import build_sequences
from mlsa4rec.data.readers import Interactions
from mlsa4rec.data.sampling import TrainSampler, all_position_windows, eval_batches


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=40)
    users = np.repeat(np.arange(40), lengths)
    items = rng.integers(1, 25, size=users.shape[0])
    return build_sequences(Interactions(users, items, np.arange(users.shape[0], dtype=float)), "t",
                           "[0,inf)", "[0,inf)")


def brute_prefix_samples(data, max_len):
    out = []
    for u in range(data.n_users):
        seq = data.items[data.offsets[u]:data.offsets[u + 1]].tolist()
        n_samples = len(seq) - 1
        n_train = n_samples - min(2, max(n_samples - 1, 0))
        for p in range(1, 1 + n_train):
            out.append((tuple(seq[max(0, p - max_len):p]), seq[p]))
    return sorted(out)


@pytest.mark.parametrize("max_len", [1, 4, 50])
@pytest.mark.parametrize("trim", [False, True])
def test_prefix_samples(data, max_len, trim) -> None:
    sampler = TrainSampler(data, "prefix", max_len, batch_size=7, seed=0, trim=trim)
    got = []
    for batch in sampler:
        assert batch.item_seq.shape[1] <= max_len
        for seq, n, t in zip(batch.item_seq.numpy(), batch.lengths.numpy(), batch.targets.numpy()):
            assert (seq[n:] == 0).all()
            got.append((tuple(seq[:n].tolist()), int(t)))
    assert sorted(got) == brute_prefix_samples(data, max_len)


@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_all_positions_cover_each_training_target_once(data, max_len) -> None:
    sampler = TrainSampler(data, "all_positions", max_len, batch_size=5, seed=1, trim=True)
    got = []
    for batch in sampler:
        for seq, n, tgt in zip(batch.item_seq.numpy(), batch.lengths.numpy(), batch.targets.numpy()):
            assert (tgt[:n] > 0).all() and (tgt[n:] == 0).all()
            # the target at position j is the item that follows the input at j
            assert (seq[1:n] == tgt[: n - 1]).all()
            for j in range(n):
                got.append((tuple(seq[: j + 1].tolist()), int(tgt[j])))
    # each target once; its in-window history is a suffix of the prefix sample's history
    want = brute_prefix_samples(data, 10_000)
    assert len(got) == len(want) == sampler.n_targets
    assert sorted(t for _, t in got) == sorted(t for _, t in want)
    a, b = all_position_windows(data, max_len)
    assert ((b - a) <= max_len).all() and ((b - a) >= 1).all()


def test_windows_end_at_the_last_training_target(data) -> None:
    a, b = all_position_windows(data, 4)
    first, end = data.train_target_range()
    last_window_end = {int(x) for x in b}
    for f, e in zip(first, end):
        if e > f:
            assert int(e) in last_window_end


def test_shuffle_is_seeded(data) -> None:
    def first_batch(seed):
        return next(iter(TrainSampler(data, "prefix", 5, 8, seed))).item_seq

    assert (first_batch(3) == first_batch(3)).all()
    assert not (first_batch(3) == first_batch(4)).all()


def test_eval_batches_cover_users_in_order(data) -> None:
    batches = list(eval_batches(data, "test", 6, batch_size=9))
    rows = np.concatenate([b.rows for b in batches])
    assert rows.tolist() == list(range(len(data.eval_targets("test"))))


def test_trimmed_eval_batches_cover_users_once_sorted_by_length(data) -> None:
    batches = list(eval_batches(data, "test", 6, batch_size=9, trim=True))
    rows = np.concatenate([b.rows for b in batches])
    assert sorted(rows.tolist()) == list(range(len(data.eval_targets("test"))))
    lengths = np.concatenate([b.lengths.numpy() for b in batches])
    assert (np.diff(lengths) >= 0).all() and all(b.item_seq.shape[1] == b.lengths.max() for b in batches)
    for b in batches:  # each row is its user's input and target
        reference = next(iter(eval_batches(data, "test", 6, batch_size=10**6)))
        assert (b.targets == reference.targets[b.rows]).all()
        assert (b.item_seq == reference.item_seq[b.rows, :b.item_seq.shape[1]]).all()


@pytest.mark.parametrize("stride", [1, 2, 5])
def test_overlapping_windows_keep_context(data, stride) -> None:
    """With stride < L every target is still used once, and sees min(its prefix, L - stride + 1)
    items of history at least."""
    max_len = 6
    sampler = TrainSampler(data, "all_positions", max_len, batch_size=4, seed=2, trim=True, stride=stride)
    got = []
    for batch in sampler:
        for seq, n, tgt in zip(batch.item_seq.numpy(), batch.lengths.numpy(), batch.targets.numpy()):
            assert (seq[1:n][tgt[: n - 1] > 0] == tgt[: n - 1][tgt[: n - 1] > 0]).all()
            for j in np.flatnonzero(tgt[:n]):
                got.append((tuple(seq[: j + 1].tolist()), int(tgt[j])))
    want = brute_prefix_samples(data, max_len)
    assert len(got) == len(want) == sampler.n_targets
    assert sorted(t for _, t in got) == sorted(t for _, t in want)
    prefix_context = sorted(len(h) for h, _ in want)
    window_context = sorted(len(h) for h, _ in got)
    floor = max_len - stride + 1
    assert all(w >= min(p, floor) for w, p in zip(window_context, prefix_context))


def test_without_bucketing_batches_are_uniform_draws(data) -> None:
    """bucket_chunks=1 (bucket_batches: false): each batch is a slice of one permutation, as in
    RecBole, and only the order inside a batch is sorted by length."""
    bucketed = TrainSampler(data, "prefix", 5, 4, seed=3, trim=True)
    uniform = TrainSampler(data, "prefix", 5, 4, seed=3, trim=True, bucket_chunks=1)
    order = np.random.default_rng(3).permutation(uniform.n_samples)
    draws = [sorted(b.tolist()) for b in np.split(order, range(4, len(order), 4))]
    assert sorted(sorted(b.tolist()) for b in uniform.epoch_batches()) == sorted(draws)
    assert sorted(sorted(b.tolist()) for b in bucketed.epoch_batches()) != sorted(draws)
