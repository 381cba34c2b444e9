"""The tie-order variants of Beauty (benchmarks/tie_orders.py): only the order inside a day changes."""

from __future__ import annotations

import gzip
import importlib.util
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("tie_orders", REPO / "benchmarks" / "tie_orders.py")
to = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("tie_orders", to)
_spec.loader.exec_module(to)

ITEMS = [5, 3, 9, 1, 4, 2]
TIMES = [10, 20, 20, 20, 30, 30]


def test_day_groups_are_runs_of_equal_times() -> None:
    assert to.day_groups(TIMES) == [(0, 1), (1, 4), (4, 6)]
    assert to.day_groups([7]) == [(0, 1)]


def test_reorders_move_items_only_inside_their_day() -> None:
    assert to.reorder(ITEMS, TIMES, "reversed") == [5, 1, 9, 3, 2, 4]
    assert to.reorder(ITEMS, TIMES, "ascending") == [5, 1, 3, 9, 2, 4]
    shuffled = to.reorder(ITEMS, TIMES, "shuffled", random.Random(0))
    for a, b in to.day_groups(TIMES):
        assert sorted(shuffled[a:b]) == sorted(ITEMS[a:b])
    assert to.reorder(ITEMS, TIMES, "shuffled", random.Random(0)) == shuffled  # seeded


def test_targets_and_popularity() -> None:
    base = {1: [1, 2, 3], 2: [3, 1, 2]}
    assert to.changed_targets(base, {1: [1, 3, 2], 2: [3, 1, 2]}) == (0.5, 0.5)
    assert to.target_popularity(base) == (2.0, 2.0)


def _write(path: Path, rows: dict[int, list[int]]) -> None:
    with gzip.open(path, "wt") as f:
        f.writelines(" ".join(map(str, (u, *r))) + "\n" for u, r in rows.items())


def test_main_writes_reproducible_variants(tmp_path: Path) -> None:
    beauty = tmp_path / "data" / "beauty"
    beauty.mkdir(parents=True)
    _write(beauty / "Beauty.txt.gz", {1: ITEMS, 2: [7, 8, 6, 5, 4]})
    _write(beauty / "Beauty_time.tiicsrec.txt.gz", {1: TIMES, 2: [1, 1, 2, 3, 3]})
    _write(beauty / "Beauty_item.tiicsrec.txt.gz", {1: [50, 10, 30, 90, 20, 40], 2: [80, 70, 60, 40, 50]})
    out = tmp_path / "out"
    assert to.main(["--data-dir", str(tmp_path / "data"), "--out", str(out), "--seeds", "1"]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["beauty-ascending.txt.gz", "beauty-reversed.txt.gz", "beauty-shuffled-1.txt.gz",
                             "beauty-tiicsrec.txt.gz"]
    assert to.read_lines(out / "beauty-reversed.txt.gz") == {1: [5, 1, 9, 3, 2, 4], 2: [8, 7, 6, 4, 5]}
    assert to.main(["--data-dir", str(tmp_path / "data"), "--out", str(out), "--seeds", "1"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # byte for byte: no gzip time stamp


def test_missing_data_is_one_error_line(tmp_path: Path, capsys) -> None:
    assert to.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_ml1m_half_keeps_the_shared_order_and_counts_changed_targets(tmp_path: Path, capsys) -> None:
    ml1m = tmp_path / "ml-1m"
    (ml1m / "extra").mkdir(parents=True)
    _write(ml1m / "ml-1m.seq.txt.gz", {1: [10, 30, 20], 2: [40, 50], 7: [60]})  # user 7: not in the partial file
    lines = ["1::20::5::100", "1::10::3::50", "1::30::4::100", "2::40::1::7", "2::50::2::8"]
    with gzip.open(ml1m / "extra" / to.PARTIAL, "wt") as f:
        f.write("\n".join(lines) + "\n")
    to.write_ml1m_half(ml1m, tmp_path)
    assert to.read_lines(tmp_path / "ml-1m-users1-2999.txt.gz") == {1: [10, 30, 20], 2: [40, 50]}
    # ratings.dat's stable order for user 1 is 10, 20, 30: both of its targets differ, user 2's do not
    assert "validation target differs for 50.0% of users, the test target for 50.0%" in capsys.readouterr().out
