"""From raw interactions to the protocol's per-user sequences and leave-one-out split.

Steps, as in RecBole 1.2's sequential pipeline (``MLSA4REC.md`` section 5):

1. iterative k-core: drop users and items whose event counts fall outside the intervals,
   counting both on the current data and dropping both at once, until nothing changes;
2. remap ids to 1..N in order of first appearance in the file (RecBole's ``factorize``); 0 = pad;
3. sort each user's events by time, stably (ties keep file order);
4. leave-one-out on the user's prefix samples, with RecBole's rule for short users: a user with
   n events has n - 1 samples (targets at positions 1..n-1); the last is test, the one before is
   validation, the rest train; with only 2 samples there is no validation target, with 1 sample
   it is a training sample.

The split is a property of the loaded data (``SequenceData.split``): leave-one-out by default, or
a ``TimeSplit`` (global cut-off dates, ``with_split``) that reads the event times kept beside the
items (``times``); every consumer asks the split methods (``train_target_range``,
``train_targets``, ``eval_targets``, ``history_start``), never the arrays' layout.

Before step 1, exact duplicate events (same user, item and timestamp) are dropped, keeping the
first: a duplicated file would otherwise put each test target right after itself in the history
and report near-perfect metrics. ``duplicate_events: keep`` keeps them where they are real.

Everything is stored as one flat array of item ids (users' sequences back to back) plus offsets,
so that every sample is "the items before flat index t" and batches are built by vectorised
gathers. The processed arrays are cached on disk, keyed by the file's checksum and the settings;
a cached file is used only after its arrays match the SHA-256 recorded when it was written and the
key stored inside it matches the key it was looked up by (else it is rebuilt, with a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import zipfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from mlsa4rec.data.readers import Interactions, read_interactions
from mlsa4rec.errors import DataError, check_choice
from mlsa4rec.fileio import atomic_path, sha256_file
from mlsa4rec.settings import DUPLICATE_RULES, SPLITS, parse_interval, parse_time

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = "[5,inf)"  # the protocol's 5-core filter, RecBole's notation
PROCESSING_VERSION = 1  # bump when the processing below changes what it produces
CACHE_FORMAT = 3  # 2: arrays carry their SHA-256 and the cache its lookup key; 3: event times kept
MAP_BYTES = 64 * 2 ** 20  # a cached array this large is memory-mapped (8.4 million events); smaller ones are read


@dataclass(frozen=True)
class LeaveOneOut:
    """RecBole's split: each user's last event is the test target, the one before it validation."""

    name = "leave_one_out"

    def describe(self) -> str:
        return "leave-one-out"


@dataclass(frozen=True)
class TimeSplit:
    """Global cut-offs (Unix seconds): training targets before ``valid_time``, each user's first
    event in [``valid_time``, ``test_time``) validation, their first at or after ``test_time`` test."""

    valid_time: float
    test_time: float
    name = "time"

    def __post_init__(self) -> None:
        if not self.valid_time < self.test_time:
            raise DataError(f"valid_time ({when(self.valid_time)}) must be before test_time ({when(self.test_time)})")

    def describe(self) -> str:
        return f"time (valid from {when(self.valid_time)}, test from {when(self.test_time)})"


SplitRule = LeaveOneOut | TimeSplit


def split_rule(split: str = "leave_one_out", valid_time: object = None, test_time: object = None) -> SplitRule:
    """The rule of the settings ``split``, ``valid_time``, ``test_time`` (``TrainConfig``'s)."""
    check_choice("split", split, SPLITS, DataError)
    if split == "leave_one_out":
        if valid_time is not None or test_time is not None:
            raise DataError("valid_time and test_time only go with split=time (split is leave_one_out)")
        return LeaveOneOut()
    if valid_time is None or test_time is None:
        raise DataError("split=time needs both valid_time and test_time (validation targets drive early stopping)")
    return TimeSplit(parse_time(valid_time, "valid_time"), parse_time(test_time, "test_time"))


def when(seconds: float) -> str:
    """Unix seconds as a UTC date (and time, where it is not midnight) for messages."""
    try:
        moment = datetime.fromtimestamp(seconds, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g} s"
    return moment.strftime("%Y-%m-%d" if moment.time() == datetime.min.time() else "%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class _TimeTargets:
    """A time split worked out once on the data: per user the end of its training targets, and the
    valid and test targets (flat indices, user order) left after dropping cold items."""

    train_end: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    dropped: dict[str, int]      # targets dropped per split because their item never occurs in training
    cold_users: dict[str, int]   # users with an event in the period but none before it


@dataclass
class SequenceData:
    """Chronological item sequences of every user after filtering and remapping."""

    name: str
    items: np.ndarray        # int64, all users' item ids back to back
    offsets: np.ndarray      # int64, n_users + 1; user u owns items[offsets[u]:offsets[u+1]]
    item_tokens: np.ndarray  # raw token of each item id; index 0 is the padding placeholder
    user_tokens: np.ndarray  # raw token of each user index
    fingerprint: str         # checksum of the source file + processing settings
    source: str = ""         # the file it was read from and its reader (set on load, not cached)
    file_sha256: str = ""    # the SHA-256 of that file (set on load, not cached)
    duplicate_events: int = 0   # exact duplicates (user, item, timestamp) found in the file
    duplicates_dropped: bool = False  # whether they were dropped (the default) or kept
    timed: bool = True       # the file has timestamps (else duplicates cannot be told from repeats)
    fingerprint_kept: str = ""  # the fingerprint with duplicates kept (what mlsa4rec <= 0.2 computed)
    times: np.ndarray | None = None  # float64 beside ``items``: each event's time (file order where not timed)
    split: SplitRule = LeaveOneOut()  # how events become targets (``with_split``); not part of the fingerprint
    _time_targets: _TimeTargets | None = field(default=None, repr=False, compare=False)

    @property
    def n_users(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def n_items(self) -> int:
        """Real items; ids run 1..n_items and 0 is padding."""
        return int(self.item_tokens.shape[0] - 1)

    @property
    def n_interactions(self) -> int:
        return int(self.items.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def stats(self) -> dict[str, float | int | str]:
        lengths = self.lengths
        return {
            "dataset": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "mean_length": round(float(lengths.mean()), 4),
            "median_length": float(np.median(lengths)),
            "min_length": int(lengths.min()),
            "max_length": int(lengths.max()),
            "density": round(self.n_interactions / (self.n_users * self.n_items), 6),
            "duplicate_events": self.duplicate_events if self.timed else "n/a (no timestamps)",
            "duplicates": ("n/a" if not self.timed else "none" if not self.duplicate_events
                           else "dropped" if self.duplicates_dropped else "kept"),
            "repeated_items": self.repeated_items(),
            **(self._split_stats() if isinstance(self.split, TimeSplit) else {}),
        }

    def _split_stats(self) -> dict[str, int | str]:
        t = self._timed_targets()
        return {"split": self.split.describe(), "train_targets": int(self.train_targets().shape[0]),
                "valid_targets": int(t.valid.shape[0]), "test_targets": int(t.test.shape[0]),
                "valid_dropped_cold_items": t.dropped["valid"], "test_dropped_cold_items": t.dropped["test"],
                "valid_cold_users": t.cold_users["valid"], "test_cold_users": t.cold_users["test"]}

    def repeated_items(self) -> int:
        """Events whose item the same user had before (repeat consumption, or duplicates in a file
        without timestamps, which cannot be told apart and are reported, not dropped)."""
        users = np.repeat(np.arange(self.n_users, dtype=np.int64), self.lengths)
        pairs = users * (self.n_items + 1) + self.items
        return int(pairs.shape[0] - np.unique(pairs).shape[0])

    # --- the split: leave-one-out or time ------------------------------------------------------
    def with_split(self, rule: SplitRule) -> SequenceData:
        """This data under another split rule: a copy sharing every array. A time split is worked
        out (and checked against the data: timestamps, dates inside it, targets in each split) here,
        once, and its summary logged."""
        if rule == self.split:
            return self
        data = replace(self, split=rule, _time_targets=None)
        if isinstance(rule, TimeSplit):
            data._timed_targets()
        return data

    def _timed_targets(self) -> _TimeTargets:
        if self._time_targets is None:
            self._time_targets = _time_split(self, self.split)
        return self._time_targets

    def _split_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out, per user: number of samples (n - 1) and how many are held out (0, 1 or 2)."""
        samples = np.maximum(self.lengths - 1, 0)
        held_out = np.clip(samples - 1, 0, 2)
        return samples, held_out

    def train_target_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per user, the flat half-open range [first, end) of training targets (every event after
        the user's first one, up to the held-out targets or, in a time split, up to valid_time)."""
        first = self.offsets[:-1] + 1
        if isinstance(self.split, TimeSplit):
            return first, self._timed_targets().train_end
        samples, held_out = self._split_counts()
        end = first + np.maximum(samples - held_out, 0)
        return first, end

    def train_targets(self) -> np.ndarray:
        """Flat index of every training target (one prefix sample each), user by user."""
        first, end = self.train_target_range()
        n = end - first
        starts = np.repeat(first - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
        return starts + np.arange(int(n.sum()))

    def eval_targets(self, split: str) -> np.ndarray:
        """Flat index of the target of each user that has one in ``split`` ('valid' or 'test')."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        if isinstance(self.split, TimeSplit):
            t = self._timed_targets()
            return t.valid if split == "valid" else t.test
        _, held_out = self._split_counts()
        last = self.offsets[1:] - 1
        if split == "test":
            return last[held_out >= 1]
        if split == "valid":
            return last[held_out == 2] - 1
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def training_counts(self) -> np.ndarray:
        """Events per item id that training saw (index 0, padding, is 0): every event but the
        held-out targets under leave-one-out; the events before valid_time under a time split.
        Popularity for serving's fallback and for popularity samplers, with nothing held out in it."""
        if isinstance(self.split, TimeSplit):
            counts = np.bincount(self.items[self.times < self.split.valid_time], minlength=self.n_items + 1)
        else:
            counts = np.bincount(self.items, minlength=self.n_items + 1)
            for split in ("valid", "test"):
                np.subtract.at(counts, self.items[self.eval_targets(split)], 1)
        counts[0] = 0
        return counts

    def history_start(self, targets: np.ndarray) -> np.ndarray:
        """Flat index where the history of each target begins (its user's first event: under both
        splits a target's history is every earlier event of its user)."""
        users = np.searchsorted(self.offsets, targets, side="right") - 1
        return self.offsets[users]


def _time_split(data: SequenceData, rule: TimeSplit) -> _TimeTargets:
    """Work out ``rule`` on ``data`` (docs/protocol.md, "Time-based split"), or refuse it in one line.

    Each user's events are sorted by time, so the events before a cut-off are a prefix of the
    user's sequence: a count per user (``np.add.reduceat``) gives where each period begins."""
    if not data.timed or data.times is None:
        raise DataError(f"{data.name} has no timestamps (its events are in file order), so split=time cannot cut it "
                        "by date; use split=leave_one_out, or a file with a timestamp column")
    times, starts, ends = data.times, data.offsets[:-1], data.offsets[1:]
    first, last = float(times[starts].min()), float(times[ends - 1].max())
    span = f"{data.name}'s events run from {when(first)} to {when(last)}"
    if last > 1e11:  # after the year 5000 as seconds: a file in milliseconds
        span += " (its timestamps look like milliseconds; the cut-offs are read as seconds)"
    if rule.valid_time <= first:
        raise DataError(f"valid_time {when(rule.valid_time)} is not after the first event, so there is nothing to "
                        f"train on; {span}")
    if rule.test_time > last:
        raise DataError(f"test_time {when(rule.test_time)} is after the last event, so there is nothing to test; "
                        f"{span}")
    before_valid = times < rule.valid_time
    valid_start = starts + np.add.reduceat(before_valid, starts, dtype=np.int64)  # first event >= valid_time
    test_start = starts + np.add.reduceat(times < rule.test_time, starts, dtype=np.int64)
    train_end = np.maximum(valid_start, starts + 1)
    seen = np.zeros(data.n_items + 1, dtype=bool)
    seen[data.items[before_valid]] = True   # items with an event in the training period
    targets, dropped, cold_users = {}, {}, {}
    for split, candidate, has_one in (("valid", valid_start, valid_start < test_start),
                                      ("test", test_start, test_start < ends)):
        cold_users[split] = int((has_one & (candidate == starts)).sum())
        target = candidate[has_one & (candidate > starts)]
        known = seen[data.items[target]]
        targets[split], dropped[split] = target[known], int((~known).sum())
    n_train = int((train_end - starts - 1).sum())
    if n_train == 0 or not len(targets["valid"]) or not len(targets["test"]):
        empty = "training" if n_train == 0 else "validation" if not len(targets["valid"]) else "test"
        raise DataError(f"the time split (valid_time {when(rule.valid_time)}, test_time {when(rule.test_time)}) "
                        f"leaves no {empty} target (a target needs an earlier event of its user and, held out, an "
                        f"item with an event before valid_time); {span}")
    log.info("%s, split by %s: %d training, %d validation, %d test targets; dropped %d validation and %d test "
             "targets whose item has no event before valid_time (no model learns an item it never trained on); "
             "%d validation and %d test users have no earlier event (cold users: no target)", data.name,
             rule.describe(), n_train, len(targets["valid"]), len(targets["test"]), dropped["valid"], dropped["test"],
             cold_users["valid"], cold_users["test"])
    for array in (train_end, *targets.values()):
        array.setflags(write=False)  # shared by every caller
    return _TimeTargets(train_end, targets["valid"], targets["test"], dropped, cold_users)


def kcore_filter(user_codes: np.ndarray, item_codes: np.ndarray, user_interval: str, item_interval: str) -> np.ndarray:
    """Boolean mask of the events that survive iterative filtering by interaction counts."""
    u_lo, u_hi = parse_interval(user_interval, "user_inter_num_interval")
    i_lo, i_hi = parse_interval(item_interval, "item_inter_num_interval")
    keep = np.ones(user_codes.shape[0], dtype=bool)
    n_users, n_items = int(user_codes.max()) + 1, int(item_codes.max()) + 1
    while True:
        u_cnt = np.bincount(user_codes[keep], minlength=n_users)
        i_cnt = np.bincount(item_codes[keep], minlength=n_items)
        ok_u = (u_cnt >= u_lo) & (u_cnt <= u_hi)
        ok_i = (i_cnt >= i_lo) & (i_cnt <= i_hi)
        new_keep = keep & ok_u[user_codes] & ok_i[item_codes]
        if new_keep.sum() == keep.sum():
            return keep
        keep = new_keep


def duplicate_mask(user_codes: np.ndarray, item_codes: np.ndarray, times: np.ndarray) -> np.ndarray:
    """True for every event equal in user, item and time to an earlier event of the file (the
    first of each group stays False, so dropping the mask keeps file order among the rest)."""
    order = np.lexsort((times, item_codes, user_codes))  # stable: the first of a group is the earliest line
    u, i, t = user_codes[order], item_codes[order], times[order]
    same = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
    mask = np.zeros(user_codes.shape[0], dtype=bool)
    mask[order[1:][same]] = True
    return mask


def build_sequences(
    inter: Interactions,
    name: str,
    user_interval: str = DEFAULT_INTERVAL,
    item_interval: str = DEFAULT_INTERVAL,
    fingerprint: str = "",
    duplicate_events: str = "drop",
) -> SequenceData:
    """Drop duplicates, filter, remap, sort: the whole pipeline from events to per-user sequences
    (vectorised). ``fingerprint`` is that of the data with duplicates kept; when some are dropped
    the result's fingerprint is derived from it, so runs trained on the duplicated data are refused."""
    check_choice("duplicate_events", duplicate_events, DUPLICATE_RULES, DataError)
    if len(inter) == 0:
        raise DataError(f"{name}: the file holds no interactions")
    timed, normalised, times = inter.timed, inter.normalised, inter.time
    user_codes, user_uniques = pd.factorize(inter.user)
    item_codes, item_uniques = pd.factorize(inter.item)
    del inter  # past their codes the raw ids are not needed: at 10^7 events they are much of the memory
    if normalised and fingerprint:  # read differently from earlier versions: not their data
        fingerprint = _derive(fingerprint, "normalised")
    n_dup, dropped, result_fingerprint = 0, False, fingerprint
    if timed:
        dup = duplicate_mask(user_codes, item_codes, times)
        n_dup = int(dup.sum())
        if n_dup and duplicate_events == "drop":
            log.warning("%s: dropped %d duplicate events (same user, item and timestamp as an earlier line); they "
                        "would put test targets in their own history. --set duplicate_events=keep keeps them",
                        name, n_dup)
            keep_rows = ~dup
            user_codes, item_codes, times = user_codes[keep_rows], item_codes[keep_rows], times[keep_rows]
            dropped = True
            result_fingerprint = _derive(fingerprint, "duplicates-dropped") if fingerprint else ""
        del dup
    keep = kcore_filter(user_codes, item_codes, user_interval, item_interval)
    if not keep.any():
        raise DataError(
            f"{name}: filtering with user_inter_num_interval={user_interval} and "
            f"item_inter_num_interval={item_interval} leaves no interactions; loosen them, e.g. "
            "--set user_inter_num_interval='[0,inf)' --set item_inter_num_interval='[0,inf)'"
        )
    # remap by first appearance among the kept events (RecBole's factorize of the kept tokens):
    # factorizing the codes gives the same ids, and the tokens are looked up once per id
    user_ids, user_seen = pd.factorize(user_codes[keep])  # 0-based
    item_ids, item_seen = pd.factorize(item_codes[keep])
    item_ids += 1                                         # 0 is padding
    times = times[keep]
    del keep, user_codes, item_codes
    user_tokens, item_tokens = np.asarray(user_uniques)[user_seen], np.asarray(item_uniques)[item_seen]
    order = np.lexsort((times, user_ids))                 # a stable sort: ties keep file order
    counts = np.bincount(user_ids, minlength=len(user_tokens))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    item_tok, user_tok = _token_array(np.asarray(item_tokens)), _token_array(np.asarray(user_tokens))
    pad = np.zeros(1, dtype=np.int64) if item_tok.dtype.kind == "i" else np.array(["[PAD]"])
    return SequenceData(
        name=name,
        times=times[order].astype(np.float64, copy=False),
        items=item_ids[order].astype(np.int64, copy=False),
        offsets=offsets,
        item_tokens=np.concatenate([pad, item_tok]),
        user_tokens=user_tok,
        fingerprint=result_fingerprint,
        duplicate_events=n_dup,
        duplicates_dropped=dropped,
        timed=timed,
        fingerprint_kept=fingerprint,
    )


def _derive(fingerprint: str, tag: str) -> str:
    return hashlib.sha256(f"{fingerprint}-{tag}".encode()).hexdigest()[:20]


def duplicates_mismatch(data: SequenceData, recorded: str | None, what: str) -> str | None:
    """Why ``what`` (a run, a checkpoint) recorded another fingerprint, when the reason is that it
    was trained with this file's duplicate events kept (before they were dropped by default)."""
    if not data.duplicates_dropped or recorded is None or recorded != data.fingerprint_kept:
        return None
    return (f"{what} was trained on {data.name!r} with its {data.duplicate_events} duplicate events (same user, item "
            "and timestamp) kept, which inflates its metrics (a test target can repeat the last history item); "
            "retrain it (the same `mlsa4rec train` command with --overwrite drops them), or, if the repeated events "
            "are real, retrain with --set duplicate_events=keep")


# --- on-disk cache ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$MLSA4REC_CACHE_DIR``, else ``~/.cache/mlsa4rec``."""
    env = os.environ.get("MLSA4REC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mlsa4rec"


def _token_array(a: np.ndarray) -> np.ndarray:
    """Tokens as a pickle-free array: int64 if they are integers, else fixed-width unicode."""
    return a.astype(np.int64) if a.dtype.kind in "iu" else a.astype(str)


_ARRAYS = ("items", "offsets", "item_tokens", "user_tokens", "times")


def array_digest(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (about 2 GB/s here; a memory map reads in place)."""
    digest = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    a = np.ascontiguousarray(a)
    if a.dtype.kind == "U":
        digest.update(a.tobytes())
    else:
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def save_cached(data: SequenceData, path: Path, key: str) -> None:
    """Write the arrays with their checksums and the ``key`` the cache is looked up by."""
    arrays = {name: getattr(data, name) for name in _ARRAYS}
    if arrays["times"] is None:  # built in code without times: their order stands in (as for untimed files)
        arrays["times"] = np.arange(data.n_interactions, dtype=np.float64)
    meta = {
        "format": CACHE_FORMAT, "key": key, "name": data.name, "fingerprint": data.fingerprint,
        "fingerprint_kept": data.fingerprint_kept, "duplicate_events": data.duplicate_events,
        "duplicates_dropped": data.duplicates_dropped, "timed": data.timed,
        "sha256": {name: array_digest(a) for name, a in arrays.items()},
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays, meta=np.array(json.dumps(meta)))


class CacheInvalid(Exception):
    """A cached dataset that must not be used: the message says why."""


class CacheOutdated(CacheInvalid):
    """A cached dataset in another cache format: rebuilt once, in the current one."""


def _format_problem(meta: object) -> str:
    """Why a cache file's format is not ``CACHE_FORMAT`` (said in the warning before it is rebuilt)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        return "it was written by an older mlsa4rec (0.2 or earlier: no checksums)"
    if meta["format"] < CACHE_FORMAT:
        return (f"it was written by an older mlsa4rec (cache format {meta['format']}: no event times, which "
                "split=time needs)")
    return f"it was written by a newer mlsa4rec (cache format {meta['format']}; this one reads {CACHE_FORMAT})"


def _check_structure(data: SequenceData) -> None:
    """Cheap O(events) checks that the arrays are a dataset at all (a forged or foreign file)."""
    items, offsets = data.items, data.offsets
    if items.dtype != np.int64 or offsets.dtype != np.int64 or items.ndim != 1 or offsets.ndim != 1:
        raise CacheInvalid("its arrays have the wrong type or shape")
    n = items.shape[0]
    if offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) <= 0):
        raise CacheInvalid("its user offsets are inconsistent")
    if data.user_tokens.shape[0] != offsets.shape[0] - 1:
        raise CacheInvalid("it has a different number of users and user ids")
    if n and (items.min() < 1 or items.max() > data.item_tokens.shape[0] - 1):
        raise CacheInvalid("it holds item ids outside its catalog")
    if data.times is None or data.times.dtype != np.float64 or data.times.shape != (n,):
        raise CacheInvalid("its event times do not match its events")


def mapped_member(path: Path, name: str) -> np.ndarray:
    """Array ``name`` of an uncompressed ``.npz`` (what ``np.savez`` writes), memory-mapped read-only
    in place instead of read into memory: a processed dataset of 5·10^7 events then costs its pages
    as they are touched, shared by every process that maps it (torchrun's ranks, serving workers).

    The member's bytes are a ``.npy`` file stored uncompressed inside the zip: its local header says
    where they begin, numpy's own header parser says where the array begins after them."""
    with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CacheInvalid(f"its {name!r} array is compressed")
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            raise CacheInvalid("its zip headers are inconsistent")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(fh))
        if dtype.hasobject:
            raise CacheInvalid(f"its {name!r} array holds Python objects")
        offset = fh.tell()
        if offset + int(np.prod(shape)) * dtype.itemsize > info.header_offset + 30 + name_length + extra_length \
                + info.compress_size:
            raise CacheInvalid(f"its {name!r} array is longer than its zip member")
    if not np.prod(shape):  # a zero-length map is not allowed
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran else "C").view(np.ndarray)


def load_cached(path: Path, key: str, name: str) -> SequenceData | None:
    """The cached dataset, or None if it is missing or fails a check (it is then rebuilt).

    Checked before use: the key stored in the file equals ``key`` (a cache copied or renamed over
    another dataset's is refused) and every array's SHA-256 equals the one recorded at write time
    (an edited array is refused). A failure is one warning line; the caller rebuilds and rewrites.
    Arrays of ``MAP_BYTES`` or more are memory-mapped (``mapped_member``), not read whole: the file
    is replaced by renaming, never rewritten in place, so a mapping keeps the verified bytes (a
    program that writes into the file in place would change them; the cache is ours alone)."""
    if not os.path.isfile(path):  # never raises: a cache folder we may not enter is a missing cache
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"][()])) if z["meta"].ndim == 0 else None
            if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
                raise CacheOutdated(_format_problem(meta))
            if meta.get("key") != key or meta.get("name") != name:
                raise CacheInvalid("it holds other data than its name says (a cache file copied or renamed)")
        arrays = {a: mapped_member(path, a) for a in _ARRAYS}
        arrays = {a: arr if arr.nbytes >= MAP_BYTES else np.array(arr) for a, arr in arrays.items()}
        for a, arr in arrays.items():
            if array_digest(arr) != meta["sha256"][a]:
                raise CacheInvalid(f"its {a!r} array differs from what was written (checksum mismatch)")
        data = SequenceData(
            name, **arrays, fingerprint=str(meta["fingerprint"]),
            duplicate_events=int(meta["duplicate_events"]), duplicates_dropped=bool(meta["duplicates_dropped"]),
            timed=bool(meta["timed"]), fingerprint_kept=str(meta["fingerprint_kept"]),
        )
        _check_structure(data)
        return data
    except CacheOutdated as exc:
        log.warning("dataset cache %s is not used: %s; rebuilding it once from the data file", path, exc)
    except CacheInvalid as exc:
        log.warning("dataset cache %s cannot be trusted: %s; rebuilding it from the data file", path, exc)
    except Exception as exc:  # a corrupt cache is not the user's problem: rebuild it
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("dataset cache %s is unreadable (%s); rebuilding it from the data file", path, reason)
    return None


def load_sequences(
    path: str | Path,
    fmt: str,
    name: str,
    user_interval: str = DEFAULT_INTERVAL,
    item_interval: str = DEFAULT_INTERVAL,
    use_cache: bool = True,
    duplicate_events: str = "drop",
) -> SequenceData:
    """Read ``path`` with reader ``fmt`` and process it, through the checksum-keyed, verified cache."""
    check_choice("duplicate_events", duplicate_events, DUPLICATE_RULES, DataError)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    t0 = time.perf_counter()
    digest = sha256_file(path)
    # the fingerprint of a file without duplicates is the one mlsa4rec <= 0.2 computed: its runs still load
    key = f"v{PROCESSING_VERSION}-{fmt}-{digest}-{user_interval}-{item_interval}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:20]
    lookup = _derive(fingerprint, f"duplicates-{duplicate_events}")
    cache_file = cache_dir() / "processed" / f"{name}-{lookup}.npz"
    if use_cache and (cached := load_cached(cache_file, lookup, name)) is not None:
        log.info("loaded %s from cache %s in %.2f s", name, cache_file, time.perf_counter() - t0)
        cached.source, cached.file_sha256 = f"{path.resolve()} ({fmt})", digest
        return cached
    data = build_sequences(read_interactions(path, fmt), name, user_interval, item_interval, fingerprint,
                           duplicate_events)
    data.source, data.file_sha256 = f"{path.resolve()} ({fmt})", digest
    if use_cache:
        try:
            save_cached(data, cache_file, lookup)
        except OSError as exc:
            log.warning("could not write dataset cache %s (%s); continuing without it", cache_file, exc)
    log.info("built %s from %s in %.2f s", name, path, time.perf_counter() - t0)
    return data
