"""Readers: one per file format, each returning the same ``Interactions`` (user, item, time).

Every reader is vectorised (pandas' C parser or one numpy conversion over all tokens); none loops
over events in Python. Ids stay raw tokens here; remapping happens in ``dataset.py``. When a
format has no timestamps, ``time`` is the event's position in the file: the order the format
promises (``.txt`` user lines), or, for a table that merely lacks the column, an assumption that is
logged as a warning.
"""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlsa4rec.errors import DataError

log = logging.getLogger("mlsa4rec")


@dataclass
class Interactions:
    """Raw events in file order. ``user``/``item`` hold tokens (int64 or str), ``time`` float64.

    ``timed`` says whether ``time`` came from a timestamp column: without one, two events can
    never be told apart as exact duplicates (their times are their positions in the file)."""

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray
    timed: bool = True
    # the reader cleaned what earlier versions read as part of an id (a byte-order mark, spaces
    # around CSV fields): the same file is then processed differently, so its fingerprint changes
    normalised: bool = False

    def __len__(self) -> int:
        return int(self.user.shape[0])


# the longest user or item id a file may hold: ids are kept as fixed-width text, so one absurd id
# (a separator or quote gone wrong can make a whole file one field) would cost its width per item
MAX_ID_CHARS = 256


def _show(token: object, width: int = 40) -> str:
    """A token for a message: its repr, cut to ``width`` characters (a line holds the message)."""
    text = str(token)
    return repr(text) if len(text) <= width else repr(text[:width]) + f"... ({len(text):,} characters)"


def read_error(path: Path, exc: OSError) -> DataError:
    """A data file the operating system will not let us read, as one line saying why and what to do."""
    if isinstance(exc, FileNotFoundError):
        return DataError(f"data file {str(path)!r} does not exist")
    if isinstance(exc, IsADirectoryError):
        return DataError(f"{str(path)!r} is a directory, not a data file; pass the file inside it")
    fix = ("check its permissions (ls -l) or run as a user allowed to read it"
           if isinstance(exc, PermissionError) else "check the disk and the file, then run again")
    return DataError(f"cannot read data file {str(path)!r}: {exc.strerror or exc}; {fix}")


def _open_text(path: Path) -> str:
    return _open_text_bom(path)[0]


def _open_text_bom(path: Path) -> tuple[str, bool]:
    """The file's text (gunzipped, UTF-8), and whether it began with a byte-order mark (dropped)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise read_error(path, exc) from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"cannot read {str(path)!r}: it is a damaged or incomplete gzip file ({exc}); copy or "
                            "download it again") from None
    if not raw.strip():
        raise DataError(f"data file {str(path)!r} is empty{' (0 bytes)' if not raw else ''}; is it the right file?")
    try:
        return raw.decode("utf-8-sig"), raw.startswith(b"\xef\xbb\xbf")  # the mark some programs write is not data
    except UnicodeDecodeError:
        raise DataError(f"{str(path)!r} is not UTF-8 text; is it the right file?") from None


def _check_id_lengths(path: Path, lengths: np.ndarray, name: str, first_line: int) -> None:
    """Refuse an id longer than ``MAX_ID_CHARS``, naming its line."""
    if lengths.size and int(lengths.max()) > MAX_ID_CHARS:
        i = int(np.argmax(lengths > MAX_ID_CHARS))
        raise DataError(f"{str(path)!r} line {first_line + i}: the {name} is {int(lengths[i]):,} characters long; ids "
                        f"may have at most {MAX_ID_CHARS} (is the separator right, or a quote left open?)")


def read_user_lines(path: str | Path) -> Interactions:
    """One line per user, ``user item_1 item_2 ...`` in chronological order (S3-Rec style)."""
    path = Path(path)
    rows = [line.split() for line in _open_text(path).splitlines()]
    line_numbers = np.array([i + 1 for i, r in enumerate(rows) if r], dtype=np.int64)
    rows = [r for r in rows if r]
    if not rows:
        raise DataError(f"{str(path)!r} holds no interactions")
    counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = list(itertools.chain.from_iterable(rows))
    if max(map(len, flat)) > MAX_ID_CHARS:  # said before a text array that wide is made
        _refuse_txt_ids(path, line_numbers, rows)
    try:
        ids = np.array(flat).astype(np.int64)
    except (OverflowError, ValueError):
        _refuse_txt_ids(path, line_numbers, rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    is_user = np.zeros(ids.shape[0], dtype=bool)
    is_user[starts] = True
    users = np.repeat(ids[starts], counts - 1)
    items = ids[~is_user]
    return Interactions(users, items, np.arange(items.shape[0], dtype=np.float64), timed=False)


def _refuse_txt_ids(path: Path, line_numbers: np.ndarray, rows: list[list[str]]) -> None:
    """Raise naming the first token of a ``.txt`` file that is not a 64-bit integer id, and its line."""
    for lineno, row in zip(line_numbers, rows):
        for tok in row:
            digits = tok[1:] if tok.startswith("-") else tok
            if not (digits.isascii() and digits.isdigit()):
                raise DataError(
                    f"{str(path)!r} line {lineno}: {_show(tok)} is not an integer id; the .txt format takes integer "
                    "user and item ids only ('user item item ...'); put other ids in a .csv or .inter file")
            if len(digits) > MAX_ID_CHARS or not -2 ** 63 <= int(tok) < 2 ** 63:
                raise DataError(f"{str(path)!r} line {lineno}: the id {_show(tok)} does not fit in 64 bits; the .txt "
                                "format takes 64-bit integer ids; put other ids in a .csv or .inter file")
    raise DataError(f"{str(path)!r}: the .txt format takes integer user and item ids only; put other ids in "
                    "a .csv or .inter file")


def _column(df: pd.DataFrame, name: str, path: Path, first_line: int, numeric: bool) -> np.ndarray:
    col = df[name]
    lengths = col.str.len().to_numpy()
    empty = lengths == 0
    if empty.any():
        line = first_line + int(np.argmax(empty))
        raise DataError(f"{str(path)!r} line {line}: missing {name!r} value")
    if not numeric:
        _check_id_lengths(path, lengths, f"{name} id", first_line)
        return col.to_numpy()
    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)  # inf would sort after every real time (or hash as an id): refuse it like nan
    if bad.any():
        i = int(np.argmax(bad))
        what = "a number" if np.isnan(values[i]) else "a finite number"
        raise DataError(f"{str(path)!r} line {first_line + i}: {name} {_show(col.iloc[i])} is not {what}; fix or "
                        "remove the line")
    return values


def _file_order(path: Path, n: int) -> np.ndarray:
    """Times for a table without a timestamp column: its line order, said once per read, because a
    file that is not chronological would otherwise give a wrong split with no sign of it."""
    log.warning("%r has no timestamp column; the file's line order is used as the time order (add a timestamp "
                "column unless the lines are chronological)", str(path))
    return np.arange(n, dtype=np.float64)


def _read_table(path: Path, text: str, sep: str, header: int | None, names: list[str] | None,
                spaced: bool = False) -> pd.DataFrame:
    """The table as text columns; ``spaced``: spaces around a value are not part of it (CSV written
    as ``1, 2, 3`` or ``"1", "2", "3"``)."""
    try:
        df = pd.read_csv(
            io.StringIO(text), sep=sep, header=header, names=names, dtype=str,
            keep_default_na=False, engine="c", skip_blank_lines=True, skipinitialspace=spaced,
        )
        if spaced:  # spaces and tabs only: other whitespace (a no-break space) may belong to an id
            for column in df.columns:
                df[column] = df[column].str.strip(" \t")
        return df
    except pd.errors.ParserError as exc:
        raise DataError(f"{str(path)!r} is malformed: {str(exc).strip()}") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{str(path)!r} is empty") from None


def _ids(values: np.ndarray) -> np.ndarray:
    """Integer tokens become int64 (cheap to hash) when that loses nothing; anything else, including
    "007" (which must stay distinct from "7", as RecBole's string tokens are), stays a string."""
    try:
        ints = values.astype(np.int64)
    except (ValueError, OverflowError):
        return values.astype(str)
    return ints if np.array_equal(ints.astype(str), values.astype(str)) else values.astype(str)


def read_inter(path: str | Path) -> Interactions:
    """RecBole atomic ``.inter``: tab-separated, typed header ``user_id:token item_id:token ...``."""
    path = Path(path)
    text, bom = _open_text_bom(path)
    header_line, _, _ = text.partition("\n")
    fields = [f.split(":", 1)[0].strip() for f in header_line.rstrip("\r").split("\t")]
    if "user_id" not in fields or "item_id" not in fields:
        raise DataError(
            f"{str(path)!r}: the header must name user_id:token and item_id:token columns "
            f"(RecBole atomic format); found {header_line.strip()!r}"
        )
    df = _read_table(path, text, "\t", 0, None)
    df.columns = fields
    if len(df) == 0:
        raise DataError(f"{str(path)!r} holds no interactions")
    user = _column(df, "user_id", path, 2, numeric=False)
    item = _column(df, "item_id", path, 2, numeric=False)
    timed = "timestamp" in fields
    time = _column(df, "timestamp", path, 2, numeric=True) if timed else _file_order(path, len(df))
    # mlsa4rec <= 0.2 kept a byte-order mark in the first column's name: a first timestamp column was not one
    return Interactions(_ids(user), _ids(item), time, timed, normalised=bom and fields[0] == "timestamp")


def read_ratings_dat(path: str | Path) -> Interactions:
    """MovieLens ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``."""
    path = Path(path)
    text = _open_text(path).replace("::", "\t")
    df = _read_table(path, text, "\t", None, ["user", "item", "rating", "timestamp"])
    if len(df) == 0:
        raise DataError(f"{str(path)!r} holds no interactions")
    out = []
    for name in ("user", "item", "timestamp"):
        values = _column(df, name, path, 1, numeric=True)
        if name != "timestamp" and not np.all(values == np.floor(values)):
            i = int(np.argmax(values != np.floor(values)))
            raise DataError(f"{str(path)!r} line {i + 1}: {name} id {_show(df[name].iloc[i])} is not an integer")
        if name != "timestamp" and np.any(np.abs(values) >= 2 ** 53):  # past it, distinct ids would merge
            i = int(np.argmax(np.abs(values) >= 2 ** 53))
            raise DataError(f"{str(path)!r} line {i + 1}: {name} id {_show(df[name].iloc[i])} is too large for "
                            f"ratings.dat (ids must be below {2 ** 53:,}); put larger ids in a .csv or .inter file")
        out.append(values)
    return Interactions(out[0].astype(np.int64), out[1].astype(np.int64), out[2])


_CSV_ALIASES = {"user": "user", "user_id": "user", "userid": "user", "item": "item", "item_id": "item",
                "itemid": "item", "rating": "rating", "timestamp": "timestamp", "time": "timestamp"}


def _header_field(field: str) -> str:
    """A CSV header name as written, in any case, with spaces or quotes around it: ``"User_ID"``."""
    field = field.strip()
    if len(field) >= 2 and field[0] == field[-1] and field[0] in "\"'":
        field = field[1:-1].strip()
    return field.lower()


def read_csv(path: str | Path) -> Interactions:
    """Plain CSV ``user,item[,rating],timestamp``, with or without a header line."""
    path = Path(path)
    text, bom = _open_text_bom(path)
    first = [_header_field(f) for f in text.partition("\n")[0].rstrip("\r").split(",")]
    has_header = all(f in _CSV_ALIASES for f in first)
    if has_header:
        names = [_CSV_ALIASES[f] for f in first]
        if "user" not in names or "item" not in names:
            raise DataError(f"{str(path)!r}: the CSV header must name user and item columns")
    elif len(first) in (3, 4):
        names = ["user", "item", "timestamp"] if len(first) == 3 else ["user", "item", "rating", "timestamp"]
    else:
        raise DataError(
            f"{str(path)!r}: expected CSV rows user,item[,rating],timestamp; line 1 has {len(first)} fields"
        )
    df = _read_table(path, text, ",", 0 if has_header else None, None if has_header else names, spaced=True)
    if has_header:
        df.columns = names
    if len(df) == 0:
        raise DataError(f"{str(path)!r} holds no interactions")
    first_line = 2 if has_header else 1
    user = _column(df, "user", path, first_line, numeric=False)
    item = _column(df, "item", path, first_line, numeric=False)
    timed = "timestamp" in names
    time = _column(df, "timestamp", path, first_line, numeric=True) if timed else _file_order(path, len(df))
    user, item = _ids(user), _ids(item)
    normalised = _csv_read_differently_before(("\ufeff" if bom else "") + text, user, item)
    return Interactions(user, item, time, timed, normalised)


def _csv_read_differently_before(raw: str, user: np.ndarray, item: np.ndarray) -> bool:
    """Whether mlsa4rec <= 0.2 read this CSV's text into other user or item ids (it kept a leading
    byte-order mark and spaces around fields inside the ids), so that the same file is other data
    now. A file it could not read at all, or read alike, is not: its fingerprint stays."""
    if not any(c in raw for c in " \t\ufeff"):  # nothing it kept that is dropped now (one scan each)
        return False
    first = raw.partition("\n")[0].rstrip("\r").split(",")
    had_header = all(f.strip().lower() in _CSV_ALIASES for f in first)
    if had_header:
        names = [_CSV_ALIASES[f.strip().lower()] for f in first]
    elif len(first) in (3, 4):
        names = ["user", "item", "timestamp"] if len(first) == 3 else ["user", "item", "rating", "timestamp"]
    else:
        return False
    try:
        old = pd.read_csv(io.StringIO(raw), sep=",", header=0 if had_header else None, names=None if had_header
                          else names, dtype=str, keep_default_na=False, engine="c", skip_blank_lines=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError):
        return False
    if had_header:
        old.columns = names
    if len(old) != len(user) or "user" not in old or "item" not in old:
        return False  # it read other rows: the header test differed, and such a file failed in 0.2
    return not (np.array_equal(_ids(old["user"].to_numpy()).astype(str), user.astype(str))
                and np.array_equal(_ids(old["item"].to_numpy()).astype(str), item.astype(str)))


def read_amazon_json(path: str | Path) -> Interactions:
    """McAuley's 2014 review dumps: one JSON object per line with reviewerID, asin, unixReviewTime."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"data file {str(path)!r} is empty (0 bytes); is it the right file?")
        df = pd.read_json(path, lines=True, compression="infer", dtype=False)
    except (OSError, EOFError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise read_error(path, exc) from None
        raise DataError(f"{str(path)!r} is a damaged or incomplete file: {exc}; copy or download it again") from None
    except ValueError as exc:
        raise DataError(f"{str(path)!r} is not a JSON-lines review file: {str(exc)[:200]}") from None
    missing = {"reviewerID", "asin", "unixReviewTime"} - set(df.columns)
    if missing:
        raise DataError(f"{str(path)!r}: review records lack {sorted(missing)}")
    time = pd.to_numeric(df["unixReviewTime"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(time)
    if bad.any():
        i = int(np.argmax(bad))
        # read_json skips blank lines: map the record back to its line for the message
        lines = [n + 1 for n, line in enumerate(_open_text(path).splitlines()) if line.strip()]
        where = f"line {lines[i]}" if i < len(lines) else f"record {i + 1}"
        raise DataError(f"{str(path)!r} {where}: unixReviewTime {_show(df['unixReviewTime'].iloc[i])} is not a "
                        "finite number of seconds; fix or remove the record")
    users, items = df["reviewerID"].astype(str), df["asin"].astype(str)
    for name, col in (("reviewerID", users), ("asin", items)):
        _check_id_lengths(path, col.str.len().to_numpy(), name, 1)  # record numbers: blank lines are not counted
    return Interactions(users.to_numpy(), items.to_numpy(), time)


def _parquet_column(column: Any, name: str, path: Path, field: str) -> np.ndarray:
    """One Parquet column as numpy, refused with one line when it has nulls or a type ids or times cannot have.

    Ids: integers (int64) or strings, as in a CSV; a float or other column is refused rather than
    rounded (5.0 and 5.1 would otherwise become one item). Times: numbers or timestamps (seconds),
    finite and not negative."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        row = int(np.argmax(np.asarray(pc.is_null(column))))
        raise DataError(f"{str(path)!r} row {row + 1}: missing {field!r} value (null); fill or drop the row")
    kind = column.type
    if name != "timestamp":
        if pa.types.is_integer(kind):
            if pa.types.is_unsigned_integer(kind) and len(column) and pc.max(column).as_py() >= 2 ** 63:
                raise DataError(f"{str(path)!r}: column {field!r} holds ids too large for 64 bits; store them as "
                                "strings")
            return column.cast(pa.int64()).to_numpy()
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind):
            values = column.cast(pa.string()) if pa.types.is_dictionary(kind) else column
            lengths = np.asarray(pc.utf8_length(values))
            if lengths.size and int(lengths.min()) == 0:
                raise DataError(f"{str(path)!r} row {int(np.argmin(lengths)) + 1}: missing {field!r} value (an empty "
                                "string); fill or drop the row")
            _check_id_lengths(path, lengths, f"{field} id", 1)
            return _ids(np.asarray(values.to_numpy(zero_copy_only=False)).astype(str))
        raise DataError(f"{str(path)!r}: column {field!r} has type {kind}; ids must be integers or strings (cast the "
                        "column, e.g. with pyarrow or pandas, and write the file again)")
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        seconds = column.cast(pa.timestamp("s")) if pa.types.is_date(kind) else column
        unit = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[seconds.type.unit]
        values = seconds.cast(pa.int64()).to_numpy().astype(np.float64) / unit
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = column.cast(pa.float64()).to_numpy()
    else:
        raise DataError(f"{str(path)!r}: column {field!r} has type {kind}; a timestamp must be a number of seconds or "
                        "a timestamp type")
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        i = int(np.argmax(bad))
        what = "not a finite number" if not np.isfinite(values[i]) else "negative"
        raise DataError(f"{str(path)!r} row {i + 1}: {field} {float(values[i]):g} is {what}; times are seconds since "
                        "1970, fix or remove the row")
    return values


def read_parquet(path: str | Path) -> Interactions:
    """A Parquet table with user and item columns and, usually, a timestamp (the CSV names:
    ``user_id``/``user``, ``item_id``/``item``, ``timestamp``/``time``, any case). Read by pyarrow
    column by column, only the columns needed: integer ids stay int64 (no text per event)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"data file {str(path)!r} is empty (0 bytes); is it the right file?")
        schema = pq.read_schema(path)
    except OSError as exc:
        raise read_error(path, exc) from None
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise DataError(f"{str(path)!r} is not a readable Parquet file ({str(exc).splitlines()[0][:160]}); is it "
                        "the right file, and complete?") from None
    columns: dict[str, str] = {}
    for name in schema.names:
        role = _CSV_ALIASES.get(_header_field(name))
        if role in ("user", "item", "timestamp"):
            if role in columns:
                raise DataError(f"{str(path)!r}: columns {columns[role]!r} and {name!r} both name the {role}; keep one")
            columns[role] = name
    missing = [role for role in ("user", "item") if role not in columns]
    if missing:
        raise DataError(f"{str(path)!r}: no {' or '.join(missing)} column (found {', '.join(schema.names)}); name "
                        "them user_id, item_id and timestamp")
    try:
        table = pq.read_table(path, columns=list(columns.values()))
    except OSError as exc:
        raise read_error(path, exc) from None
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise DataError(f"cannot read {str(path)!r}: {str(exc).splitlines()[0][:160]}; copy or write it "
                        "again") from None
    if table.num_rows == 0:
        raise DataError(f"{str(path)!r} holds no interactions")
    user = _parquet_column(table.column(columns["user"]), "user", path, columns["user"])
    item = _parquet_column(table.column(columns["item"]), "item", path, columns["item"])
    timed = "timestamp" in columns
    time = (_parquet_column(table.column(columns["timestamp"]), "timestamp", path, columns["timestamp"]) if timed
            else _file_order(path, table.num_rows))
    return Interactions(user, item, time, timed)


READERS: dict[str, Callable[[str | Path], Interactions]] = {
    "user-lines": read_user_lines,
    "inter": read_inter,
    "ratings-dat": read_ratings_dat,
    "csv": read_csv,
    "amazon-json": read_amazon_json,
    "parquet": read_parquet,
}


def detect_format(path: str | Path) -> str:
    """Pick a reader from a file name; the suffixes are the ones ``--dataset`` documents."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".inter"):
        return "inter"
    if name.endswith(".dat"):
        return "ratings-dat"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".txt"):
        return "user-lines"
    if name.endswith(".json") or name.endswith(".jsonl"):
        return "amazon-json"
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    raise DataError(
        f"cannot tell the format of {str(path)!r}: use a .inter (RecBole atomic), ratings.dat "
        "(MovieLens), .csv (user,item[,rating],timestamp), .parquet (user_id, item_id, timestamp columns) or "
        ".txt[.gz] (one line per user, integer ids) file"
    )


def read_interactions(path: str | Path, fmt: str | None = None) -> Interactions:
    fmt = fmt or detect_format(path)
    if Path(path).is_dir():
        raise DataError(f"{str(path)!r} is a directory, not a data file; pass the file inside it")
    if not Path(path).is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    return READERS[fmt](path)
