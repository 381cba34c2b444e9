"""Each reader on small hand-written files, including the malformed inputs it must refuse."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest

from mlsa4rec.data.readers import detect_format, read_interactions
from mlsa4rec.errors import DataError


def test_user_lines_plain_and_gzip(tmp_path: Path) -> None:
    text = "1 10 11 12\n\n2 13 10\n"
    plain = tmp_path / "a.txt"
    plain.write_text(text)
    gz = tmp_path / "a.txt.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    for path in (plain, gz):
        inter = read_interactions(path)
        assert inter.user.tolist() == [1, 1, 1, 2, 2]
        assert inter.item.tolist() == [10, 11, 12, 13, 10]
        assert inter.time.tolist() == [0, 1, 2, 3, 4]  # file order is the time


def test_user_lines_rejects_non_integer(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("1 10 11\n2 13 x7\n")
    with pytest.raises(DataError, match=r"line 2: 'x7' is not an integer"):
        read_interactions(path)


def test_inter_with_extra_columns_and_string_tokens(tmp_path: Path) -> None:
    path = tmp_path / "d.inter"
    path.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\tcomment:token_seq\n"
        "ua\tix\t5\t30\tgood\nub\tiy\t3\t10\tmeh\nua\tiy\t4\t20\tok\n"
    )
    inter = read_interactions(path)
    assert inter.user.tolist() == ["ua", "ub", "ua"]
    assert inter.item.tolist() == ["ix", "iy", "iy"]
    assert inter.time.tolist() == [30.0, 10.0, 20.0]


def test_leading_zero_tokens_stay_distinct(tmp_path: Path) -> None:
    path = tmp_path / "d.inter"
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t007\t1\n1\t7\t2\n")
    inter = read_interactions(path)
    assert inter.item.tolist() == ["007", "7"]
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t5\t1\n1\t7\t2\n")
    assert read_interactions(path).item.tolist() == [5, 7]


def test_inter_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.inter"
    path.write_text("user:token\titem:token\n1\t2\n")
    with pytest.raises(DataError, match="user_id:token"):
        read_interactions(path)
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\tsoon\n")
    with pytest.raises(DataError, match=r"line 3: timestamp 'soon' is not a number"):
        read_interactions(path)
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\t6\t7\t8\n")
    with pytest.raises(DataError, match="malformed"):
        read_interactions(path)


def test_ratings_dat(tmp_path: Path) -> None:
    path = tmp_path / "ratings.dat"
    path.write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    inter = read_interactions(path)
    assert detect_format(path) == "ratings-dat"
    assert inter.user.tolist() == [1, 1, 2]
    assert inter.item.tolist() == [1193, 661, 1193]
    assert inter.time.tolist() == [978300760, 978302109, 978298413]
    path.write_text("1::1193::5::978300760\n1::abc::3::978302109\n")
    with pytest.raises(DataError, match=r"line 2: item 'abc' is not a number"):
        read_interactions(path)


@pytest.mark.parametrize(
    "text, users, times",
    [
        ("u1,i1,5\nu1,i2,3\n", ["u1", "u1"], [5.0, 3.0]),                     # user,item,timestamp
        ("u1,i1,4.5,5\nu1,i2,1,3\n", ["u1", "u1"], [5.0, 3.0]),              # user,item,rating,timestamp
        ("user,item,rating,timestamp\nu1,i1,4,5\nu1,i2,2,3\n", ["u1", "u1"], [5.0, 3.0]),
        ("item_id,user_id,time\ni1,u1,5\ni2,u1,3\n", ["u1", "u1"], [5.0, 3.0]),  # header decides order
    ],
)
def test_csv(tmp_path: Path, text: str, users: list[str], times: list[float]) -> None:
    path = tmp_path / "x.csv"
    path.write_text(text)
    inter = read_interactions(path)
    assert inter.user.tolist() == users
    assert inter.item.tolist() == ["i1", "i2"]
    assert inter.time.tolist() == times


def test_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("u1,i1\n")
    with pytest.raises(DataError, match="user,item"):
        read_interactions(path)
    path.write_text("u1,i1,5\nu1,,6\n")
    with pytest.raises(DataError, match=r"line 2: missing 'item'"):
        read_interactions(path)


def test_amazon_json(tmp_path: Path) -> None:
    path = tmp_path / "reviews.json.gz"
    lines = [
        '{"reviewerID": "A1", "asin": "B01", "overall": 5.0, "unixReviewTime": 1303862400}',
        '{"reviewerID": "A2", "asin": "B02", "overall": 3.0, "unixReviewTime": 1303862401}',
    ]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    inter = read_interactions(path, "amazon-json")
    assert inter.user.tolist() == ["A1", "A2"]
    assert np.array_equal(inter.time, [1303862400, 1303862401])


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(tmp_path / "data.xlsx")
    with pytest.raises(DataError, match="does not exist"):
        read_interactions(tmp_path / "nope.csv")


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "a.txt.gz"
    path.write_bytes(gzip.compress(b"1 2 3 4\n" * 1000)[:50])
    with pytest.raises(DataError, match="cannot read"):
        read_interactions(path)


@pytest.mark.realdata
def test_real_ratings_dat_fixture(shared_data: Path) -> None:
    """The partial ML-1M ratings.dat (users 1-2999) parses, with the counts PROVENANCE states."""
    inter = read_interactions(shared_data / "ml-1m" / "extra" / "ratings.users1-2999.partial.dat.gz", "ratings-dat")
    assert len(inter) == 487_650
    assert len(np.unique(inter.user)) == 2_999
    assert len(np.unique(inter.item)) == 3_615
    assert inter.time.min() == 970620734 and inter.time.max() == 1046388675


@pytest.mark.parametrize("stamp", ["inf", "-inf", "Infinity", "nan", "NaN"])
@pytest.mark.parametrize(
    ("name", "template"),
    [
        ("d.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\t{}\n"),
        ("d.csv", "user,item,timestamp\nu1,i1,5\nu1,i2,{}\n"),
        ("ratings.dat", "1::1193::5::978300760\n1::661::3::{}\n"),
    ],
    ids=["inter", "csv", "ratings-dat"],
)
def test_non_finite_timestamps_are_refused(tmp_path: Path, name: str, template: str, stamp: str) -> None:
    path = tmp_path / name
    path.write_text(template.format(stamp))
    with pytest.raises(DataError, match=rf"line \d: timestamp '{stamp}' is not a (finite )?number"):
        read_interactions(path)


@pytest.mark.parametrize(("name", "text", "fmt", "message"), [
    ("ratings.dat", "1::1193::5::978300760\ninf::661::3::978300761\n", None, r"line 2: user 'inf' is not a finite"),
    ("reviews.json", '{"reviewerID": "A1", "asin": "B01", "unixReviewTime": 1303862400}\n\n'  # blank lines count
     '{"reviewerID": "A2", "asin": "B02", "unixReviewTime": "soon"}\n', "amazon-json",
     r"line 3: unixReviewTime 'soon' is not a finite number"),
])
def test_non_finite_ids_and_review_times_are_refused(tmp_path: Path, name: str, text: str, fmt: str | None,
                                                     message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_interactions(path, *([fmt] if fmt else []))


def test_missing_timestamp_column_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Taking the file order as the time order silently would hide a wrong file from the user."""
    inter = tmp_path / "d.inter"
    inter.write_text("user_id:token\titem_id:token\n1\t2\n1\t3\n")
    csv = tmp_path / "d.csv"
    csv.write_text("user,item\nu1,i1\nu1,i2\n")
    for path in (inter, csv):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mlsa4rec"):
            assert read_interactions(path).time.tolist() == [0.0, 1.0]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and warnings[0].name == "mlsa4rec", caplog.text
        assert "has no timestamp column" in caplog.text and "line order is used as the time order" in caplog.text


def test_ordered_formats_do_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = tmp_path / "a.txt"
    lines.write_text("1 10 11 12\n2 13 10\n")
    inter = tmp_path / "d.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n1\t3\t6\n")
    with caplog.at_level(logging.DEBUG, logger="mlsa4rec"):
        read_interactions(lines)
        read_interactions(inter)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_user_lines_error_says_ids_must_be_integers(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("u1 10 11\n")
    with pytest.raises(DataError, match=r"line 1: 'u1' is not an integer id; the \.txt format takes integer user "
                                        r"and item ids .*\.csv or \.inter"):
        read_interactions(path)


# --- Parquet -------------------------------------------------------------------------------------
def _parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_reads_like_the_csv_of_the_same_table(tmp_path: Path) -> None:
    rows = {"user_id": [3, 1, 3, 2], "item_id": ["a", "007", "7", "a"], "timestamp": [5, 2, 1, 9]}
    got = read_interactions(_parquet(tmp_path / "d.parquet", rows))
    csv = tmp_path / "d.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in zip(*rows.values())))
    want = read_interactions(csv)
    assert detect_format(tmp_path / "d.parquet") == detect_format(tmp_path / "d.pq") == "parquet"
    assert got.timed and got.user.tolist() == want.user.tolist() and got.item.tolist() == want.item.tolist()
    assert got.item.tolist() == ["a", "007", "7", "a"]  # "007" stays distinct from "7", as in a CSV
    assert np.array_equal(got.time, want.time)


def test_parquet_integer_ids_stay_integers_and_timestamps_become_seconds(tmp_path: Path) -> None:
    import pyarrow as pa

    path = _parquet(tmp_path / "d.parquet", {"User": pa.array([1, 2], pa.int32()),
                                             "ITEM": pa.array([7, 8], pa.uint16()),
                                             "time": pa.array([1_000, 2_500], pa.timestamp("ms"))})
    got = read_interactions(path)
    assert got.user.dtype == np.int64 and got.item.tolist() == [7, 8] and got.time.tolist() == [1.0, 2.5]


def test_parquet_without_timestamps_is_taken_in_row_order(tmp_path: Path, caplog) -> None:
    got = read_interactions(_parquet(tmp_path / "d.parquet", {"user_id": [1, 1], "item_id": [5, 6]}))
    assert not got.timed and got.time.tolist() == [0.0, 1.0]
    assert "no timestamp column" in caplog.text


@pytest.mark.parametrize("columns, message", [
    ({"user_id": [1, None], "item_id": [1, 2], "timestamp": [1, 2]}, r"row 2: missing 'user_id' value"),
    ({"user_id": ["a", ""], "item_id": [1, 2]}, r"row 2: missing 'user_id' value \(an empty string\)"),
    ({"user_id": [1, 2], "item_id": [1.0, 2.0], "timestamp": [1, 2]}, r"'item_id' has type double; ids must be"),
    ({"user_id": [1, 2], "item_id": [1, 2], "timestamp": ["x", "y"]}, r"'timestamp' has type string"),
    ({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1, -2]}, r"row 2: timestamp -2 is negative"),
    ({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1.0, float("inf")]}, r"row 2: timestamp inf is not a finite"),
    ({"uid": [1, 2], "item_id": [1, 2]}, r"no user column \(found uid, item_id\)"),
    ({"user_id": [1], "item": [1], "item_id": [1]}, r"columns 'item' and 'item_id' both name the item"),
    ({"user_id": [], "item_id": []}, r"holds no interactions"),
    ({"user_id": [1], "item_id": [2 ** 64 - 1]}, r"'item_id' holds ids too large for 64 bits"),
])
def test_bad_parquet_is_one_line(tmp_path: Path, columns: dict, message: str) -> None:
    import pyarrow as pa

    if not columns.get("user_id", [0]):
        columns = {"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64())}
    elif columns.get("item_id") == [2 ** 64 - 1]:
        columns = {"user_id": columns["user_id"], "item_id": pa.array(columns["item_id"], pa.uint64())}
    with pytest.raises(DataError, match=message) as err:
        read_interactions(_parquet(tmp_path / "bad.parquet", columns))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"hello", b"PAR1" + b"\0" * 20])
def test_a_file_that_is_not_parquet_is_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    with pytest.raises(DataError, match="empty|not a readable Parquet file") as err:
        read_interactions(path)
    assert "\n" not in str(err.value)
