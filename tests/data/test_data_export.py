"""``mlsa4rec data export``: the processed dataset as Parquet, read back by mlsa4rec itself.

The export is a data file: prepared again with the same filters it gives the same sequences (by the
file's own tokens and times), and every event carries its internal ids, position and split role.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import one_error
from mlsa4rec.cli import main
from mlsa4rec.data import load_dataset, split_rule
from mlsa4rec.data.export import ROLES, event_roles

V, T, DAY = 1388534400, 1393632000, 86400  # 2014-01-01 and 2014-03-01, UTC
NO_FILTER = ["--set", "user_inter_num_interval=[0,inf)", "--set", "item_inter_num_interval=[0,inf)"]


@pytest.fixture
def events(tmp_path: Path) -> Path:
    """Six users with events on both sides of V and T, rows newest first; string ids that look numeric."""
    rng = np.random.default_rng(3)
    rows = []
    for u in range(6):
        times = np.sort(rng.integers(V - 40 * DAY, T + 40 * DAY, size=8))
        rows += [f"u{u:02d},{rng.integers(0, 9):03d},{t}" for t in times]
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows[::-1]) + "\n")
    return path


def sequences(data) -> dict[str, list[tuple[str, float]]]:
    """Each user's (item token, time) events, by the user's token."""
    return {str(data.user_tokens[u]): [(str(data.item_tokens[i]), float(t)) for i, t in zip(
        data.items[data.offsets[u]:data.offsets[u + 1]], data.times[data.offsets[u]:data.offsets[u + 1]])]
        for u in range(data.n_users)}


@pytest.mark.parametrize("split", [[], ["--set", "split=time", "--set", f"valid_time={V}", "--set", f"test_time={T}"]])
def test_the_export_reads_back_as_the_same_sequences_with_roles(events: Path, tmp_path: Path, split: list) -> None:
    out = tmp_path / "processed.parquet"
    assert main(["-q", "data", "export", str(events), "--out", str(out), *NO_FILTER, *split]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["user_id", "item_id", "timestamp", "user_index", "item_index", "position", "role"]
    rule = split_rule("time", V, T) if split else split_rule()
    data = load_dataset(str(events), user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)",
                        split=rule)
    again = load_dataset(str(out), user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)")
    assert sequences(again) == sequences(data)  # "007"-style ids stay strings, times exact
    assert table.column("item_index").to_numpy().tolist() == data.items.tolist()
    assert table.column("user_index").to_numpy().tolist() == np.repeat(np.arange(data.n_users), data.lengths).tolist()
    assert table.column("position").to_numpy().tolist() == [p for n in data.lengths for p in range(n)]
    roles = np.array(table.column("role").to_pylist())
    assert roles.tolist() == [ROLES[r] for r in event_roles(data)]
    assert np.flatnonzero(roles == "train").tolist() == data.train_targets().tolist()
    for name in ("valid", "test"):
        assert np.flatnonzero(roles == name).tolist() == sorted(data.eval_targets(name).tolist())
    meta = table.schema.metadata
    assert meta[b"mlsa4rec.fingerprint"].decode() == data.fingerprint
    assert meta[b"mlsa4rec.split"].decode() == data.split.describe()


def test_untimed_data_has_no_timestamp_column(tmp_path: Path) -> None:
    lines = tmp_path / "seqs.txt"
    lines.write_text("1 1 2 3 4 5\n2 2 3 4 5 1\n3 3 4 5 1 2\n")
    out = tmp_path / "out.pq"
    assert main(["-q", "data", "export", str(lines), "--out", str(out), *NO_FILTER]) == 0
    assert "timestamp" not in pq.read_table(out).column_names
    # the first token of a line is the user: five events each
    roles = pq.read_table(out).column("role").to_pylist()
    assert roles[:6] == ["context", "train", "train", "valid", "test", "context"]


def test_refusals_leave_nothing_written(events: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "kept.parquet"
    out.write_bytes(b"the user's own file")
    one_error(capsys, ["data", "export", str(events), "--out", str(out)], "already exists", "--overwrite")
    assert out.read_bytes() == b"the user's own file"
    one_error(capsys, ["data", "export", str(events), "--out", str(tmp_path / "x.csv")], "must end in .parquet")
    one_error(capsys, ["data", "export", str(events), "--out", str(tmp_path)], "is a directory")
    one_error(capsys, ["data", "export", str(events), "--out", str(tmp_path / "y.parquet"), "--set", "epochs=3"],
              "data export accepts only", "'epochs'")
    one_error(capsys, ["data", "export", str(events), "--out", str(tmp_path / "z.parquet"), "--set", "split=time",
                       "--set", "valid_time=1990-01-01", "--set", "test_time=1991-01-01"], "valid_time")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv", "kept.parquet"]  # no temporary file left
    assert main(["-q", "data", "export", str(events), "--out", str(out), "--overwrite", *NO_FILTER]) == 0
    assert pq.read_table(out).num_rows == 48
