"""Filtering, remapping, sorting, the leave-one-out split and the processed-data cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlsa4rec.data import load_dataset
from mlsa4rec.data.dataset import build_sequences, cache_dir, kcore_filter
from mlsa4rec.data.readers import Interactions
from mlsa4rec.errors import DataError


def inter(users, items, times=None) -> Interactions:
    times = np.arange(len(users), dtype=float) if times is None else np.asarray(times, dtype=float)
    return Interactions(np.asarray(users), np.asarray(items), times)


def test_kcore_is_iterative() -> None:
    # 2-core. Item 9 has one event, so it goes in round 1; that leaves user 2 with one event, so
    # user 2 goes in round 2; that leaves item 5 with one event, so it goes in round 3.
    users = np.array([1, 1, 1, 2, 2, 3, 3, 3])
    items = np.array([5, 6, 7, 9, 5, 6, 7, 6])
    keep = kcore_filter(users, items, "[2,inf)", "[2,inf)")
    assert keep.tolist() == [False, True, True, False, False, True, True, True]


def test_upper_bounds_are_honoured() -> None:
    users = np.array([1, 1, 1, 2, 2])
    items = np.array([1, 2, 3, 1, 2])
    keep = kcore_filter(users, items, "[0,2]", "[0,inf)")
    assert keep.tolist() == [False, False, False, True, True]


def test_remap_first_appearance_and_stable_sort() -> None:
    data = build_sequences(
        inter(["b", "a", "b", "a", "b"], ["x", "y", "z", "x", "y"], [5, 1, 5, 0, 3]),
        "t", "[0,inf)", "[0,inf)",
    )
    assert data.user_tokens.tolist() == ["b", "a"]               # user index by first appearance
    assert data.item_tokens.tolist() == ["[PAD]", "x", "y", "z"]  # item ids 1.. by first appearance
    # user b: y@3, then x@5 and z@5 tied -> file order x, z; user a: x@0, y@1
    assert data.items.tolist() == [2, 1, 3, 1, 2]
    assert data.offsets.tolist() == [0, 3, 5]


def test_split_and_recbole_short_user_rule() -> None:
    # lengths 5, 3, 2, 1 -> samples 4, 2, 1, 0
    users = [0] * 5 + [1] * 3 + [2] * 2 + [3]
    items = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    data = build_sequences(inter(users, items), "t", "[0,inf)", "[0,inf)")
    assert data.train_targets().tolist() == [1, 2, 6, 9]            # flat indices of train targets
    assert data.eval_targets("valid").tolist() == [3]               # only the 5-event user
    assert data.eval_targets("test").tolist() == [4, 7]             # 5- and 3-event users
    assert data.history_start(np.array([4, 7, 9])).tolist() == [0, 5, 8]


def test_empty_after_filtering() -> None:
    with pytest.raises(DataError, match="leaves no interactions"):
        build_sequences(inter([1, 2], [1, 2]), "tiny")


def test_cache_is_used_and_keyed_by_settings(successor_file: Path) -> None:
    a = load_dataset(str(successor_file))
    files = sorted((cache_dir() / "processed").glob("succ-*.npz"))
    assert len(files) >= 1
    b = load_dataset(str(successor_file))
    assert a.fingerprint == b.fingerprint and np.array_equal(a.items, b.items)
    c = load_dataset(str(successor_file), user_inter_num_interval="[7,inf)")
    assert c.fingerprint != a.fingerprint and c.n_users < a.n_users


def test_corrupt_cache_is_rebuilt(successor_file: Path) -> None:
    a = load_dataset(str(successor_file))
    for f in (cache_dir() / "processed").glob(f"succ-{a.fingerprint}.npz"):
        f.write_bytes(b"garbage")
    b = load_dataset(str(successor_file))
    assert np.array_equal(a.items, b.items)


def test_changed_file_changes_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("1 1 2 3 4 5\n2 1 2 3 4 5\n3 1 2 3 4 5\n4 1 2 3 4 5\n5 1 2 3 4 5\n")
    a = load_dataset(str(path))
    path.write_text("1 1 2 3 4 5\n2 1 2 3 4 5\n3 1 2 3 4 5\n4 1 2 3 4 5\n5 5 4 3 2 1\n")
    b = load_dataset(str(path))
    assert a.fingerprint != b.fingerprint
    assert a.items.tolist() != b.items.tolist()


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name, expected",
    [("ml-1m", (6040, 3416, 999611)), ("amazon-beauty", (22363, 12101, 198502)),
     ("amazon-video-games", (24303, 10672, 231780))],
)
def test_real_dataset_counts(shared_data: Path, name: str, expected: tuple[int, int, int]) -> None:
    data = load_dataset(name, shared_data, use_cache=False)
    assert (data.n_users, data.n_items, data.n_interactions) == expected
