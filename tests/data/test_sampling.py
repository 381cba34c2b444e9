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


# --- cloze (BERT4Rec, RecBole 1.2.1's MaskItemSequence) -------------------------------------------
from mlsa4rec.data.sampling import Cloze, cloze_masks, cloze_uniforms  # noqa: E402

MASK = 99


def test_cloze_masks_hand_worked() -> None:
    """RecBole's rule on two histories, L = 10, mask_ratio 0.2 (so at most 2 targets each)."""
    lengths = np.array([6, 1])
    u = np.full((2, 10), 0.9)
    u[0, [0, 2, 3, 5]] = 0.1     # row 0: positions 0, 2, 3, 5 masked; targets the last two: 3, 5
    u[1, [0, 7]] = 0.1           # row 1: only position 0 is real; masked, but position 0 takes no loss
    masked, target = cloze_masks(lengths, 10, np.array([False, False]), u, 0.2, 2)
    assert np.flatnonzero(masked[0]).tolist() == [0, 2, 3, 5]
    assert np.flatnonzero(target[0]).tolist() == [3, 5]
    assert np.flatnonzero(masked[1]).tolist() == [0] and not target[1].any()
    # fewer masks than the cap: all are targets except position 0
    u[0] = 0.9
    u[0, [0, 4]] = 0.1
    masked, target = cloze_masks(lengths, 10, np.array([False, False]), u, 0.2, 2)
    assert np.flatnonzero(masked[0]).tolist() == [0, 4] and np.flatnonzero(target[0]).tolist() == [4]
    # a fine-tuning batch masks only the last history item, whatever the uniforms say
    masked, target = cloze_masks(lengths, 10, np.array([True, True]), u, 0.2, 2)
    assert np.flatnonzero(masked[0]).tolist() == [5] and np.flatnonzero(target[0]).tolist() == [5]
    assert np.flatnonzero(masked[1]).tolist() == [0] and not target[1].any()


def test_cloze_uniforms_depend_only_on_key_row_and_position() -> None:
    rows = np.array([5, 9, 2])
    u = cloze_uniforms(7, rows, 6)
    assert u.shape == (3, 6) and (u >= 0).all() and (u < 1).all()
    np.testing.assert_array_equal(cloze_uniforms(7, rows[[2, 0]], 4), u[[2, 0], :4])  # batch/width free
    assert not np.array_equal(cloze_uniforms(8, rows, 6), u)
    big = cloze_uniforms(3, np.arange(20_000), 50)
    assert abs(big.mean() - 0.5) < 0.002 and abs((big < 0.2).mean() - 0.2) < 0.002


def test_cloze_batches(data) -> None:
    """Every batch holds the prefix samples' histories, masked as RecBole does."""
    max_len, ratio = 8, 0.25
    sampler = TrainSampler(data, "cloze", max_len, batch_size=16, seed=3, trim=True,
                           cloze=Cloze(mask_token=MASK, mask_ratio=ratio, ft_ratio=0.5))
    histories = sorted(h for h, _ in brute_prefix_samples(data, max_len))
    got, kinds, n_masked, n_real = [], [], 0, 0
    for epoch in range(20):
        for batch in sampler:
            seq, lengths, tgt = batch.item_seq.numpy(), batch.lengths.numpy(), batch.targets.numpy()
            is_mask = seq == MASK
            fine_tune = all(is_mask[b, :n].sum() == 1 and is_mask[b, n - 1] for b, n in enumerate(lengths))
            kinds.append(fine_tune)
            for row, n, t, m in zip(seq, lengths, tgt, is_mask):
                assert (row[n:] == 0).all() and (t[n:] == 0).all() and not m[n:].any()
                assert t[0] == 0 and (t > 0).sum() <= int(ratio * max_len)
                assert (m[t > 0]).all()  # only masked positions are targets...
                if m[1:n].sum() <= int(ratio * max_len):
                    assert (t[1:n] > 0).tolist() == m[1:n].tolist()  # ...and every one of them under the cap
                if epoch == 0:
                    original = np.where(m, 0, row)
                    got.append((tuple(original[:n].tolist()), tuple(t[:n].tolist())))
                if not fine_tune:
                    n_masked, n_real = n_masked + int(m[:n].sum()), n_real + int(n)
    # the unmasked items plus the targets give back the histories where every mask is a target
    rebuilt = sorted(tuple(o or t for o, t in zip(orig, tgt)) for orig, tgt in got
                     if 0 not in [o or t for o, t in zip(orig, tgt)])
    assert set(rebuilt) <= set(histories) and len(got) == len(histories)
    assert 0.35 < np.mean(kinds) < 0.65                     # ft_ratio of the batches fine-tune
    assert abs(n_masked / n_real - ratio) < 0.02             # each item masked with mask_ratio
    assert sampler.n_targets is None


def test_cloze_is_the_same_however_batches_are_split(data) -> None:
    """A distributed step's shards, an untrimmed batch and a resumed epoch see the same masks."""
    kw = dict(batch_size=12, seed=5, cloze=Cloze(mask_token=MASK, mask_ratio=0.3, ft_ratio=0.5))
    a = TrainSampler(data, "cloze", 40, trim=True, **kw)
    state = a.rng_state
    rows = a.epoch_batches()[1]
    whole = a.batch(rows)
    for part in (rows[0::2], rows[1::2]):
        shard = a.batch(part)
        width = shard.item_seq.shape[1]
        index = [list(rows).index(r) for r in part]
        np.testing.assert_array_equal(shard.item_seq.numpy(), whole.item_seq.numpy()[index, :width])
        np.testing.assert_array_equal(shard.targets.numpy(), whole.targets.numpy()[index, :width])
    assert a.targets_in(rows) == a.targets_in(rows[0::2]) + a.targets_in(rows[1::2]) == int((whole.targets > 0).sum())
    resumed = TrainSampler(data, "cloze", 40, trim=True, **kw)
    resumed.rng_state = state
    assert np.array_equal(resumed.epoch_batches()[1], rows)
    np.testing.assert_array_equal(resumed.batch(rows).item_seq.numpy(), whole.item_seq.numpy())
    np.testing.assert_array_equal(resumed.batch(rows).targets.numpy(), whole.targets.numpy())
    a.trim = False
    untrimmed = a.batch(rows)
    width = whole.item_seq.shape[1]
    assert untrimmed.item_seq.shape[1] == 40 > width
    np.testing.assert_array_equal(untrimmed.item_seq.numpy()[:, :width], whole.item_seq.numpy())
    assert (untrimmed.item_seq.numpy()[:, width:] == 0).all()


def test_cloze_needs_its_settings(data) -> None:
    with pytest.raises(ValueError, match="cloze scheme needs"):
        TrainSampler(data, "cloze", 10, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="cloze scheme needs"):
        TrainSampler(data, "prefix", 10, batch_size=4, seed=0, cloze=Cloze(MASK, 0.2, 0.5))
