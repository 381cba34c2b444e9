"""RecBole's atomic data files, both ways: what we write is what RecBole (and our reader) reads back.

The weight converter's tests are in tests/test_convert.py (through its public path
``mlsa4rec.convert``, which re-exports ``mlsa4rec.interop.recbole``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlsa4rec.data import SequenceData, load_dataset
from mlsa4rec.errors import DataError
from mlsa4rec.interop.recbole import (
    INTER_HEADER,
    export_recbole,
    import_recbole,
    inter_path,
    same_sequences,
    token_sequences,
)

OFF = "[0,inf)"


def _load(path: Path, interval: str) -> SequenceData:
    return load_dataset(str(path), None, interval, interval, use_cache=False)


def _split_tokens(data: SequenceData) -> dict[str, list[tuple[str, str]]]:
    """(user token, target item token) of every sample of every split."""
    out = {}
    for split in ("train", "valid", "test"):
        targets = data.train_targets() if split == "train" else data.eval_targets(split)
        users = np.searchsorted(data.offsets, targets, side="right") - 1
        out[split] = [(str(data.user_tokens[u]), str(data.item_tokens[data.items[t]])) for u, t in zip(users, targets)]
    return out


def _timestamps(inter: Path) -> dict[str, list[float]]:
    per_user: dict[str, list[float]] = {}
    for line in inter.read_text().splitlines()[1:]:
        user, _, ts = line.split("\t")
        per_user.setdefault(user, []).append(float(ts))
    return per_user


@pytest.mark.parametrize("interval", ["[5,inf)", OFF])
def test_export_then_import_round_trips_exactly(successor_file: Path, tmp_path: Path, interval: str) -> None:
    original = _load(successor_file, "[5,inf)")
    inter = export_recbole(original, tmp_path / "export")
    assert inter == inter_path(tmp_path / "export", original.name) == tmp_path / "export" / "succ" / "succ.inter"
    assert sorted(p.name for p in inter.parent.iterdir()) == ["succ.inter"]  # no temporary file left behind
    back = import_recbole(inter, user_inter_num_interval=interval, item_inter_num_interval=interval, use_cache=False)
    assert back.name == original.name
    # the file lists users, then their events, in our order: ids come back the same, not only tokens
    for field in ("items", "offsets", "item_tokens", "user_tokens"):
        assert np.array_equal(getattr(back, field), getattr(original, field)), field
    assert same_sequences(back, original)
    assert _split_tokens(back) == _split_tokens(original)
    # RecBole's data_path and dataset name, or its dataset folder, name the same file
    for where in (import_recbole(tmp_path / "export", "succ", use_cache=False),
                  import_recbole(tmp_path / "export" / "succ", use_cache=False)):
        assert np.array_equal(where.items, back.items) and np.array_equal(where.offsets, back.offsets)


def test_string_tokens_out_of_file_order_round_trip_by_token(tmp_path: Path) -> None:
    csv = tmp_path / "shop.csv"
    csv.write_text("user,item,timestamp\n"
                   "bob,x9,3\nann,007,1\nbob,7,1\nann,x9,2\ncy,7,5\nbob,007,2\ncy,x9,4\nann,7,3\ncy,007,6\n")
    data = _load(csv, OFF)
    back = import_recbole(export_recbole(data, tmp_path / "out", "shop"), user_inter_num_interval=OFF,
                          item_inter_num_interval=OFF, use_cache=False)
    assert same_sequences(back, data)
    assert token_sequences(back) == [["7", "007", "x9"], ["007", "x9", "7"], ["x9", "7", "007"]]  # "007" != "7"
    assert _split_tokens(back) == _split_tokens(data)


def test_import_refuses_a_file_that_is_not_atomic_data(tmp_path: Path) -> None:
    csv = tmp_path / "events.csv"
    csv.write_text("user,item,timestamp\nu,a,1\n")
    with pytest.raises(DataError, match="not a RecBole atomic .inter file"):
        import_recbole(csv)
    with pytest.raises(DataError, match="does not exist"):
        import_recbole(tmp_path, "missing")


def test_export_timestamps_are_positions_without_ties(successor_file, tmp_path):
    data = _load(successor_file, "[5,inf)")
    inter = export_recbole(data, tmp_path)
    header = inter.read_text().splitlines()[0]
    assert header == "user_id:token\titem_id:token\ttimestamp:float"
    assert header == INTER_HEADER
    per_user = _timestamps(inter)
    assert len(per_user) == data.n_users
    for ts, n in zip(per_user.values(), data.lengths):
        assert ts == [float(p) for p in range(1, n + 1)]


def test_hand_worked_three_users(tmp_path):
    # u2 ties b/a at t=20 (file order keeps b first); u1 ties a/b at t=10 and is out of order in
    # the file; u3 is in order. Items and users keep their raw string tokens.
    csv = tmp_path / "three.csv"
    csv.write_text("user,item,timestamp\n"
                   "u2,b,20\nu1,a,10\nu1,c,5\nu2,a,20\nu3,c,1\nu1,b,10\nu3,b,2\nu3,a,3\nu2,c,30\nu1,d,7\n")
    data = _load(csv, OFF)
    inter = export_recbole(data, tmp_path / "out", "three")
    assert inter.read_text() == (
        "user_id:token\titem_id:token\ttimestamp:float\n"
        "u2\tb\t1\nu2\ta\t2\nu2\tc\t3\n"
        "u1\tc\t1\nu1\td\t2\nu1\ta\t3\nu1\tb\t4\n"
        "u3\tc\t1\nu3\tb\t2\nu3\ta\t3\n"
    )
    back = _load(inter, OFF)
    assert token_sequences(back) == [["b", "a", "c"], ["c", "d", "a", "b"], ["c", "b", "a"]]
    # leave-one-out: 3 events -> train + test, 4 events -> train + valid + test
    assert _split_tokens(back) == {
        "train": [("u2", "a"), ("u1", "d"), ("u3", "b")],
        "valid": [("u1", "a")],
        "test": [("u2", "c"), ("u1", "b"), ("u3", "a")],
    }
    assert _split_tokens(back) == _split_tokens(data)


def test_export_refuses_tokens_that_break_the_format(tmp_path):
    csv = tmp_path / "tab.csv"
    csv.write_text('user,item,timestamp\nu1,"a\tb",1\nu1,c,2\n')
    with pytest.raises(ValueError, match="token"):
        export_recbole(_load(csv, OFF), tmp_path / "out")


def test_the_converter_exists_once_under_both_paths():
    import mlsa4rec.convert as convert
    import mlsa4rec.interop.recbole as recbole

    for name in convert.__all__:
        assert getattr(convert, name) is getattr(recbole, name)
