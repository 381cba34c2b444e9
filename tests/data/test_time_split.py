"""The time-based split (``split: time``, global cut-offs ``valid_time`` < ``test_time``) beside
leave-one-out, whose arrays and fingerprints must not move (docs/protocol.md, "Time-based split").

The hand-made file below has events on both sides of each cut-off; V = 2014-01-01, T = 2014-03-01:

user a: i1 V-10d, i2 V-5d | i3 V+1d, i4 V+2d | i5 T+1d, i6 T+2d   train i2; valid i3; test i5 (history 4)
user b: | i1 V+1d, i2 V+3d | i3 T+1d                               cold for valid; test i3 (history 2)
user c: | | i1 T+1d, i2 T+2d                                        only test-period events: no target
user d: i1 V-3d, i2 V-2d | i7 V+1d | i7 T+1d                        train i2; i7 never before V: both dropped
user e: i3 V-4d, i4 V-3d, i5 V-2d, i6 V-1d                          train i4 i5 i6; nothing held out
user f: i2 V-1d | i6 at V | i1 at T                                 the cut-offs belong to the later period
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import one_error
from mlsa4rec.cli import main
from mlsa4rec.config import build_config, parse_set
from mlsa4rec.data import LeaveOneOut, SequenceData, TimeSplit, load_dataset, split_of, split_rule
from mlsa4rec.data.dataset import array_digest, cache_dir
from mlsa4rec.data.itemmap import ItemMap
from mlsa4rec.data.sampling import Cloze, TrainSampler, eval_batches
from mlsa4rec.errors import ConfigError, DataError, MLSA4RecError
from mlsa4rec.settings import TrainConfig

V, T, DAY = 1388534400, 1393632000, 86400  # 2014-01-01 and 2014-03-01, UTC
EVENTS = {
    "a": [(1, V - 10 * DAY), (2, V - 5 * DAY), (3, V + DAY), (4, V + 2 * DAY), (5, T + DAY), (6, T + 2 * DAY)],
    "b": [(1, V + DAY), (2, V + 3 * DAY), (3, T + DAY)],
    "c": [(1, T + DAY), (2, T + 2 * DAY)],
    "d": [(1, V - 3 * DAY), (2, V - 2 * DAY), (7, V + DAY), (7, T + DAY)],
    "e": [(3, V - 4 * DAY), (4, V - 3 * DAY), (5, V - 2 * DAY), (6, V - DAY)],
    "f": [(2, V - DAY), (6, V), (1, T)],
}
NO_FILTER = {"user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)"}


def write_events(path: Path, events: dict[str, list[tuple[int, int]]]) -> Path:
    """A headed CSV, rows newest first (the split must not depend on file order)."""
    rows = [f"{user},i{item},{time}" for user, seq in events.items() for item, time in seq][::-1]
    path.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture
def hand(tmp_path: Path) -> Path:
    return write_events(tmp_path / "hand.csv", EVENTS)


def timed(path: Path, valid=V, test=T, **kwargs) -> SequenceData:
    return load_dataset(str(path), **{**NO_FILTER, **kwargs}, split=split_rule("time", valid, test))


def pairs(data: SequenceData, targets: np.ndarray) -> list[tuple[str, str]]:
    """(user, item) tokens of flat target indices, sorted."""
    users = np.searchsorted(data.offsets, targets, side="right") - 1
    return sorted((str(data.user_tokens[u]), str(data.item_tokens[data.items[t]])) for u, t in zip(users, targets))


# --- the rules, one by one ----------------------------------------------------------------------
def test_training_targets_are_the_events_before_valid_time_with_an_earlier_event(hand: Path) -> None:
    data = timed(hand)
    assert pairs(data, data.train_targets()) == [("a", "i2"), ("d", "i2"), ("e", "i4"), ("e", "i5"), ("e", "i6")]
    assert (data.times[data.train_targets()] < V).all()


def test_validation_target_is_the_first_event_of_the_period_with_its_whole_history(hand: Path) -> None:
    data = timed(hand)
    valid = data.eval_targets("valid")
    # a: i3 (not i4, the second); f: i6 at exactly valid_time; b: cold (no earlier event); d: i7 dropped
    assert pairs(data, valid) == [("a", "i3"), ("f", "i6")]
    assert sorted((valid - data.history_start(valid)).tolist()) == [1, 2]


def test_test_target_is_the_first_event_at_or_after_test_time_with_every_earlier_event(hand: Path) -> None:
    data = timed(hand)
    test = data.eval_targets("test")
    # f: i1 at exactly test_time; b: warm by its validation-period events; c: cold; d: i7 dropped
    assert pairs(data, test) == [("a", "i5"), ("b", "i3"), ("f", "i1")]
    users = [str(data.user_tokens[u]) for u in np.searchsorted(data.offsets, test, side="right") - 1]
    history = dict(zip(users, (test - data.history_start(test)).tolist()))
    assert history == {"a": 4, "b": 2, "f": 2}  # a's history includes its two validation-period events
    batch = next(eval_batches(data, "test", max_seq_length=8, batch_size=10))
    row_a = users.index("a")
    a_history = [str(data.item_tokens[i]) for i in batch.item_seq[row_a, :batch.lengths[row_a]].tolist()]
    assert a_history == ["i1", "i2", "i3", "i4"] and str(data.item_tokens[int(batch.targets[row_a])]) == "i5"


def test_cold_item_targets_are_dropped_and_counted_once(hand: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mlsa4rec"):
        data = timed(hand)
        stats = data.stats()
    lines = [r.getMessage() for r in caplog.records if "split by time" in r.getMessage()]
    assert len(lines) == 1 and "dropped 1 validation and 1 test targets" in lines[0], lines
    assert {k: stats[k] for k in ("train_targets", "valid_targets", "test_targets", "valid_dropped_cold_items",
                                  "test_dropped_cold_items", "valid_cold_users", "test_cold_users")} == {
        "train_targets": 5, "valid_targets": 2, "test_targets": 3, "valid_dropped_cold_items": 1,
        "test_dropped_cold_items": 1, "valid_cold_users": 1, "test_cold_users": 1}
    assert stats["split"] == "time (valid from 2014-01-01, test from 2014-03-01)"
    assert "split" not in data.with_split(LeaveOneOut()).stats()  # leave-one-out stats as before


def test_a_user_with_only_test_period_events_has_no_target_anywhere(hand: Path) -> None:
    data = timed(hand)
    c = int(np.flatnonzero(data.user_tokens == "c")[0])
    c_events = set(range(data.offsets[c], data.offsets[c + 1]))
    every = np.concatenate([data.train_targets(), data.eval_targets("valid"), data.eval_targets("test")])
    assert not c_events & set(every.tolist())


def test_every_consumer_sees_the_split(hand: Path) -> None:
    """The training schemes, evaluation batches and item popularity ask the split, not the layout."""
    data = timed(hand)
    train = set(data.train_targets().tolist())
    prefix = TrainSampler(data, "prefix", 8, 4, seed=0)
    assert sorted(prefix.targets.tolist()) == sorted(train)
    cloze = TrainSampler(data, "cloze", 8, 4, seed=0, cloze=Cloze(data.n_items + 1, 0.5, 0.5))
    assert sorted(cloze.end.tolist()) == sorted(train)  # a cloze sample is a prefix history
    windows = TrainSampler(data, "all_positions", 8, 4, seed=0)
    got = []
    for batch in windows:
        got += [int(t) for t in batch.targets.flatten().tolist() if t]
    assert sorted(got) == sorted(data.items[sorted(train)].tolist())
    for split in ("valid", "test"):
        targets = np.concatenate([b.targets.numpy() for b in eval_batches(data, split, 8, 2)])
        assert sorted(targets.tolist()) == sorted(data.items[data.eval_targets(split)].tolist())
    # popularity counts what training saw: the events before valid_time, not those after it
    trained = np.bincount(data.items[data.times < V], minlength=data.n_items + 1)[1:]
    assert ItemMap.from_data(data).counts.tolist() == trained.tolist()
    everything = np.bincount(data.items, minlength=data.n_items + 1)[1:]
    assert trained.sum() < everything.sum()


def test_the_split_shares_the_arrays_and_keeps_the_fingerprint(hand: Path) -> None:
    plain = load_dataset(str(hand), **NO_FILTER)
    split = plain.with_split(TimeSplit(V, T))
    assert split.items is plain.items and split.times is plain.times and split.offsets is plain.offsets
    assert split.fingerprint == plain.fingerprint and plain.split == LeaveOneOut()
    assert plain.with_split(LeaveOneOut()) is plain
    assert pairs(plain, plain.eval_targets("test")) == sorted(  # leave-one-out untouched: the last event of
        (u, f"i{max(seq, key=lambda e: e[1])[0]}") for u, seq in EVENTS.items() if len(seq) >= 3)  # 2+ samples


@pytest.mark.parametrize("valid, test", [
    ("2014-01-01", "2014-03-01"),
    (V, T),
    (float(V), str(T)),
    ("2014-01-01T00:00:00Z", "2014-03-01T00:00:00+00:00"),
    ("2014-01-01T01:00:00+01:00", "2014-02-28T19:00:00-05:00"),
    (dt.date(2014, 1, 1), dt.datetime(2014, 3, 1)),  # what YAML reads from a bare date
])
def test_an_iso_date_and_seconds_give_the_same_split(hand: Path, valid, test) -> None:
    settings = TrainConfig(split="time", valid_time=valid, test_time=test)
    assert split_of(settings) == TimeSplit(V, T)
    data = timed(hand, valid, test)
    reference = timed(hand)
    for split in ("valid", "test"):
        assert np.array_equal(data.eval_targets(split), reference.eval_targets(split))
    assert isinstance(settings.valid_time, (int, float, str)) and isinstance(settings.test_time, (int, float, str))


def test_set_reads_a_bare_date_and_config_records_it_as_text(tmp_path: Path) -> None:
    config = build_config("sasrec", [], parse_set(["split=time", "valid_time=2014-01-01", "test_time=2014-03-01"]))
    assert config["valid_time"] == "2014-01-01" and config["test_time"] == "2014-03-01"
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(config.to_dict()))
    again = build_config("sasrec", [saved])
    assert split_of(again.train) == split_of(config.train) == TimeSplit(V, T)
    assert json.dumps(config.to_dict())  # records and results are JSON


# --- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, needles", [
    ({"split": "time"}, ("both valid_time and test_time", "early stopping")),
    ({"split": "time", "valid_time": "2014-01-01"}, ("both valid_time and test_time",)),
    ({"split": "time", "valid_time": "2014-03-01", "test_time": "2014-01-01"}, ("must be before test_time",)),
    ({"split": "time", "valid_time": V, "test_time": V}, ("must be before test_time",)),
    ({"split": "time", "valid_time": "first of May", "test_time": T}, ("valid_time", "ISO-8601")),
    ({"split": "time", "valid_time": V, "test_time": True}, ("test_time", "ISO-8601")),
    ({"split": "time", "valid_time": float("nan"), "test_time": T}, ("valid_time",)),
    ({"valid_time": "2014-01-01"}, ("only go with split=time",)),
    ({"test_time": T}, ("only go with split=time",)),
    ({"split": "date"}, ("split",)),
])
def test_bad_split_settings_are_one_line_errors(settings: dict, needles: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(**settings)
    assert "\n" not in str(info.value)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_data_without_timestamps_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"{u} 1 2 3 4 5 6\n" for u in range(1, 8)))
    untimed = tmp_path / "untimed.csv"
    untimed.write_text("user,item\n" + "".join(f"{u},{i}\n" for u in range(1, 8) for i in range(1, 7)))
    for path, name in ((lines, "lines"), (untimed, "untimed")):
        with pytest.raises(DataError, match=rf"^{name} has no timestamps .*split=leave_one_out"):
            timed(path)
    one_error(capsys, ["data", "stats", str(lines), "--set", "split=time", "--set", "valid_time=2014-01-01",
                       "--set", "test_time=2014-03-01"], "lines has no timestamps")


@pytest.mark.parametrize("valid, test, needle", [
    (V - 20 * DAY, T, "valid_time 2013-12-12 is not after the first event"),
    (V - 10 * DAY, T, "is not after the first event"),  # nothing strictly before it
    (V, T + 3 * DAY, "test_time 2014-03-04 is after the last event"),
])
def test_a_cut_off_outside_the_data_is_refused_with_its_dates(hand: Path, valid, test, needle: str) -> None:
    with pytest.raises(DataError) as info:
        timed(hand, valid, test)
    message = str(info.value)
    assert needle in message and "events run from 2013-12-22 to 2014-03-03" in message and "\n" not in message


def test_a_split_without_test_or_validation_targets_is_refused(tmp_path: Path) -> None:
    # x has no event at or after test_time; y's only one there has no earlier event (cold)
    path = write_events(tmp_path / "notest.csv", {"x": [(1, 1000), (2, 2000), (1, 3000)], "y": [(9, 4000)]})
    with pytest.raises(DataError, match="leaves no test target.*events run from"):
        timed(path, 2500, 4000)
    # x's only validation-period event is an item never seen before valid_time (dropped)
    path = write_events(tmp_path / "novalid.csv", {"x": [(1, 1000), (2, 2000), (3, 3000), (1, 5000)]})
    with pytest.raises(DataError, match="leaves no validation target"):
        timed(path, 2500, 4000)


def test_data_stats_shows_the_split_and_refuses_times_with_leave_one_out(hand: Path, capsys) -> None:
    filters = ["--set", "user_inter_num_interval=[0,inf)", "--set", "item_inter_num_interval=[0,inf)"]
    assert main(["data", "stats", str(hand), "--json", *filters, "--set", "split=time", "--set",
                 "valid_time=2014-01-01", "--set", f"test_time={T}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["valid_targets"], stats["test_targets"], stats["test_dropped_cold_items"]) == (2, 3, 1)
    assert main(["data", "stats", str(hand), *filters]) == 0
    assert "test_targets" not in capsys.readouterr().out
    one_error(capsys, ["data", "stats", str(hand), *filters, "--set", "valid_time=2014-01-01"],
              "only go with split=time")
    one_error(capsys, ["data", "stats", str(hand), *filters, "--set", "split=time", "--set", "valid_time=2014-03-01",
                       "--set", "test_time=2014-01-01"], "must be before test_time")


# --- the cache keeps the times ------------------------------------------------------------------
def cache_file(name: str) -> Path:
    files = sorted((cache_dir() / "processed").glob(f"{name}-*.npz"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize("mapped", [False, True])
def test_the_cache_round_trip_keeps_the_times(hand: Path, monkeypatch, caplog, mapped: bool) -> None:
    import mlsa4rec.data.dataset as dataset

    built = load_dataset(str(hand), **NO_FILTER)
    assert built.times.dtype == np.float64 and built.times.shape == built.items.shape
    assert all((np.diff(built.times[a:b]) >= 0).all() for a, b in zip(built.offsets[:-1], built.offsets[1:]))
    if mapped:
        monkeypatch.setattr(dataset, "MAP_BYTES", 0)  # every array counts as large
    with caplog.at_level(logging.WARNING):
        cached = load_dataset(str(hand), **NO_FILTER)
    assert caplog.text == "" and np.array_equal(cached.times, built.times)
    assert isinstance(getattr(cached.times, "base", None), np.memmap) == mapped
    assert pairs(cached.with_split(TimeSplit(V, T)), cached.with_split(TimeSplit(V, T)).eval_targets("test")) == \
        pairs(built.with_split(TimeSplit(V, T)), built.with_split(TimeSplit(V, T)).eval_targets("test"))


def _rewrite(path: Path, meta: object, drop: tuple[str, ...] = ("times",)) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k not in drop and k != "meta"}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays, meta=np.array(meta if isinstance(meta, list) else json.dumps(meta)))


@pytest.mark.parametrize("old, says", [
    ("format-2", "cache format 2: no event times, which split=time needs"),
    ("0.2", "0.2 or earlier: no checksums"),
])
def test_an_older_cache_is_rebuilt_once_with_a_warning_that_says_why(hand: Path, caplog, old: str, says: str) -> None:
    built = load_dataset(str(hand), **NO_FILTER)
    path = cache_file("hand")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"][()]))
    if old == "format-2":  # what the previous version wrote: checksums, no times
        meta["format"] = 2
        meta["sha256"].pop("times")
        _rewrite(path, meta)
    else:
        _rewrite(path, ["hand", built.fingerprint])
    with caplog.at_level(logging.WARNING):
        again = load_dataset(str(hand), **NO_FILTER)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and says in warnings[0] and "rebuilding it once" in warnings[0], warnings
    assert "cannot be trusted" not in warnings[0]
    assert np.array_equal(again.times, built.times) and np.array_equal(again.items, built.items)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_dataset(str(hand), **NO_FILTER)
    assert not caplog.records  # rewritten in the current format


def test_a_cache_whose_times_do_not_fit_its_events_is_rebuilt(hand: Path, caplog) -> None:
    built = load_dataset(str(hand), **NO_FILTER)
    path = cache_file("hand")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"][()]))
        arrays = {k: z[k] for k in z.files if k != "meta"}
    arrays["times"] = arrays["times"][:-1]
    meta["sha256"]["times"] = array_digest(arrays["times"])  # a consistent file, a wrong shape
    with open(path, "wb") as fh:
        np.savez(fh, **arrays, meta=np.array(json.dumps(meta)))
    with caplog.at_level(logging.WARNING):
        again = load_dataset(str(hand), **NO_FILTER)
    assert "event times do not match" in caplog.text and np.array_equal(again.times, built.times)


# --- leave-one-out unchanged (pinned before the time split existed) -----------------------------
def pinned_rows() -> list[tuple[str, str, int]]:
    rows = []
    for k in range(30):
        for t in range(5 + k % 5):
            rows.append((f"u{k}", f"i{(k * 7 + t * 3) % 12}", 1_000_000 + k * 13 + (t // 2) * 100))
    rows.insert(3, rows[0])  # one exact duplicate (dropped, so the fingerprint is the derived one)
    return rows


def loo_digest(data: SequenceData) -> str:
    digest = hashlib.sha256()
    for a in (data.items, data.offsets, data.item_tokens, data.user_tokens, data.train_targets(),
              data.eval_targets("valid"), data.eval_targets("test")):
        digest.update(array_digest(np.asarray(a)).encode())
    return digest.hexdigest()


# (fingerprint, fingerprint with duplicates kept, digest of the arrays and the leave-one-out targets),
# computed with the code before the time split (git HEAD) on the files written below
PINNED = {
    ("pinned.csv", "drop"): ("b12aeb35a39b416c5ebd", "e4416d3c714b5518067e",
                             "6fcee334cd46f108172284393d7b095b3f59ecad68944b648681188a46080184"),
    ("pinned.csv", "keep"): ("e4416d3c714b5518067e", "e4416d3c714b5518067e",
                             "5071e832aa1569050da44f37d3cc82b777f2cb4fae53bf1118d06aeb2fa00004"),
    ("pinlines.txt", "drop"): ("c6e84ac06f4520d015f4", "c6e84ac06f4520d015f4",
                               "5d6f164adb784f967bef0e88f286cef0b5ea77cdf8780c8e5d8cc3d8d21ce01a"),
    ("pinlines.txt", "keep"): ("c6e84ac06f4520d015f4", "c6e84ac06f4520d015f4",
                               "5d6f164adb784f967bef0e88f286cef0b5ea77cdf8780c8e5d8cc3d8d21ce01a"),
}


def test_leave_one_out_arrays_and_fingerprints_are_unchanged(tmp_path: Path) -> None:
    (tmp_path / "pinned.csv").write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n"
                                                                          for u, i, t in pinned_rows()))
    seqs: dict[int, list[int]] = {}
    for u, i, _ in pinned_rows()[:3] + pinned_rows()[4:]:
        seqs.setdefault(int(u[1:]) + 1, []).append(int(i[1:]) + 1)
    (tmp_path / "pinlines.txt").write_text("".join(f"{u} " + " ".join(map(str, s)) + "\n" for u, s in seqs.items()))
    for (file, duplicates), expected in PINNED.items():
        for attempt in ("built", "cached"):
            data = load_dataset(str(tmp_path / file), duplicate_events=duplicates)
            assert (data.fingerprint, data.fingerprint_kept, loo_digest(data)) == expected, (file, duplicates, attempt)
            assert data.split == LeaveOneOut() and data.stats().keys() >= {"users", "items", "interactions"}


# the registered datasets of shared/data, as the code before the time split processed them
REAL = {
    "ml-1m": ("880f40becbafc147b97d", "bc7794251ec862ad5353eb58321c6e292095d5e25fa8b019bfcf7de28578b40d"),
    "amazon-beauty": ("04307da72ddeae0879d2", "182bfeb8b46a4db2cf70b5f9a5aff3b3382f059776698deaea6c0cbd22736e53"),
    "amazon-video-games": ("a43aee96350b52b6d6ea",
                           "ed9853845f93a271fbbea11eafff8cb3ab941a6793bd655c4a360ff58b15ca53"),
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(REAL))
def test_registered_datasets_are_unchanged_and_refuse_a_time_split(shared_data: Path, name: str) -> None:
    data = load_dataset(name, shared_data)
    assert (data.fingerprint, loo_digest(data)) == REAL[name]
    with pytest.raises(DataError, match="has no timestamps"):
        data.with_split(TimeSplit(V, T))


# --- end to end ---------------------------------------------------------------------------------
TINY = ["--set", "hidden_size=8", "--set", "inner_size=16", "--set", "n_layers=1", "--set", "n_heads=1",
        "--set", "MAX_ITEM_LIST_LENGTH=8", "--set", "epochs=2", "--set", "train_batch_size=64", "--set", "seed=3"]


def walk_events(n_users: int = 150, n_items: int = 20, seed: int = 7) -> dict[str, list[tuple[int, int]]]:
    """Users walking items in steps of one, a week apart, starting between 60 days before valid_time
    and 40 days after it: many cross both cut-offs, some start after valid_time."""
    rng = np.random.default_rng(seed)
    events = {}
    for u in range(n_users):
        start, first = int(rng.integers(n_items)), V - 60 * DAY + int(rng.integers(100)) * DAY
        events[f"u{u}"] = [((start + k) % n_items + 1, first + 7 * DAY * k) for k in range(int(rng.integers(6, 15)))]
    return events


def expected_test_users(events: dict[str, list[tuple[int, int]]]) -> set[str]:
    """The rules written out plainly: first event at or after T, with an earlier event, of an item
    that some user had before V."""
    trained = {item for seq in events.values() for item, time in seq if time < V}
    users = set()
    for user, seq in events.items():
        later = [k for k, (_, time) in enumerate(seq) if time >= T]
        if later and later[0] > 0 and seq[later[0]][0] in trained:
            users.add(user)
    return users


def test_train_with_a_time_split_end_to_end(tmp_path: Path, capsys) -> None:
    from mlsa4rec.evaluation.runs import compare_runs, evaluate_run, run_ranks
    from mlsa4rec.runs.loading import load_run

    events = walk_events()
    path = write_events(tmp_path / "walks.csv", events)
    expected = expected_test_users(events)
    assert 30 < len(expected) < len(events)  # the rules leave out some users, and keep enough
    out = tmp_path / "run"
    assert main(["train", "--model", "sasrec", "--dataset", str(path), "--output-dir", str(out), *TINY,
                 "--set", "split=time", "--set", "valid_time=2014-01-01", "--set", "test_time=2014-03-01"]) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["users"] == len(events) and results["dataset"]["test_targets"] == len(expected)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["split"], saved["valid_time"], saved["test_time"]) == ("time", "2014-01-01", "2014-03-01")
    run = load_run(out)
    ranks = run_ranks(run, "test")  # the run's own split, from its config.yaml
    targets = run.data.eval_targets("test")
    users = {str(run.data.user_tokens[u]) for u in np.searchsorted(run.data.offsets, targets, side="right") - 1}
    assert users == expected and len(ranks) == len(expected)
    again = evaluate_run(out)
    assert again["test"] == pytest.approx(results["test"], abs=1e-9)
    assert again["valid"] == pytest.approx(results["valid"], abs=1e-9)
    # the same file split leave-one-out has other users and targets: a paired comparison is refused
    other = tmp_path / "loo"
    assert main(["train", "--model", "sasrec", "--dataset", str(path), "--output-dir", str(other), *TINY,
                 "--set", "epochs=1"]) == 0
    with pytest.raises(MLSA4RecError, match="split otherwise"):
        compare_runs([out, other], n_resamples=10)
