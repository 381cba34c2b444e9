"""The processed-data cache is verified before use, and duplicate events never inflate metrics.

Both were silent wrong numbers: an edited or swapped cache file gave other metrics (or another
dataset's) with exit 0, and a file with every event twice reported test HR@10 = 1.0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import successor_sequences
from mlsa4rec.cli import main
from mlsa4rec.data import load_dataset
from mlsa4rec.data.dataset import array_digest, cache_dir, load_sequences
from mlsa4rec.errors import ConfigError, MLSA4RecError
from mlsa4rec.evaluation.runs import evaluate_run
from mlsa4rec.fileio import sha256_file
from mlsa4rec.training.run import train

TINY = {"hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 8,
        "learning_rate": 0.01, "epochs": 2, "train_batch_size": 64, "seed": 3}


def write_csv(path: Path, seqs: list[list[int]], times: bool = True, twice: bool = False) -> Path:
    """``user,item,timestamp`` rows (time = position in the user's sequence), each row twice if asked."""
    lines = ["user,item,timestamp" if times else "user,item"]
    for u, seq in enumerate(seqs):
        for t, item in enumerate(seq):
            row = f"{u + 1},{item},{1000 + t}" if times else f"{u + 1},{item}"
            lines += [row, row] if twice else [row]
    path.write_text("\n".join(lines) + "\n")
    return path


def cache_file_of(name: str) -> Path:
    files = sorted((cache_dir() / "processed").glob(f"{name}-*.npz"))
    assert len(files) == 1, files
    return files[0]


def rewrite_npz(path: Path, **changes: np.ndarray) -> None:
    """Save ``path`` again, validly, with some arrays replaced: what a hand edit would do."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


# --- the verified cache ---------------------------------------------------------------------------
def test_an_edited_cache_array_is_detected_and_rebuilt(tmp_path: Path, caplog) -> None:
    path = write_csv(tmp_path / "edit.csv", successor_sequences(60, 20, seed=2))
    clean = load_dataset(str(path))
    cached = cache_file_of("edit")
    with np.load(cached) as z:
        items = z["items"].copy()
    items[::7] = 1  # still valid item ids: only the checksum can tell
    rewrite_npz(cached, items=items)
    with caplog.at_level(logging.WARNING):
        again = load_dataset(str(path))
    assert np.array_equal(again.items, clean.items) and again.fingerprint == clean.fingerprint
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "checksum" in warnings[0] and "rebuilding" in warnings[0], warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the rebuilt cache is trusted again, silently
        third = load_dataset(str(path))
    assert np.array_equal(third.items, clean.items) and not caplog.records


def test_a_cache_swapped_with_another_datasets_is_not_used(tmp_path: Path, caplog) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a_path = write_csv(tmp_path / "a" / "swapshop.csv", successor_sequences(60, 20, seed=2))
    b_path = write_csv(tmp_path / "b" / "swapshop.csv", successor_sequences(80, 25, seed=5))
    a = load_dataset(str(a_path))
    b = load_dataset(str(b_path))
    a_cache, b_cache = sorted((cache_dir() / "processed").glob("swapshop-*.npz"), key=lambda p: p.stat().st_mtime)
    tmp = a_cache.with_suffix(".swap")
    a_cache.rename(tmp)
    b_cache.rename(a_cache)
    tmp.rename(b_cache)  # each file now sits under the other's name: valid files, wrong data
    with caplog.at_level(logging.WARNING):
        a2, b2 = load_dataset(str(a_path)), load_dataset(str(b_path))
    assert (a2.n_users, a2.fingerprint) == (a.n_users, a.fingerprint) and np.array_equal(a2.items, a.items)
    assert (b2.n_users, b2.fingerprint) == (b.n_users, b.fingerprint) and np.array_equal(b2.items, b.items)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("other data" in w for w in warnings), warnings


@pytest.mark.parametrize("damage", ["offsets", "tokens", "meta-missing", "old-format", "garbage"])
def test_every_damaged_cache_is_rebuilt_with_one_warning(tmp_path: Path, caplog, damage: str) -> None:
    path = write_csv(tmp_path / "dmg.csv", successor_sequences(50, 20, seed=4))
    clean = load_dataset(str(path))
    cached = cache_file_of("dmg")
    with np.load(cached) as z:
        arrays = {k: z[k] for k in z.files}
    if damage == "offsets":
        rewrite_npz(cached, offsets=arrays["offsets"][::-1].copy())
    elif damage == "tokens":
        rewrite_npz(cached, user_tokens=arrays["user_tokens"][::-1].copy())
    elif damage == "meta-missing":
        del arrays["meta"]
        with open(cached, "wb") as fh:
            np.savez(fh, **arrays)
    elif damage == "old-format":  # what mlsa4rec 0.2 wrote: no checksums to verify
        rewrite_npz(cached, meta=np.array(["dmg", clean.fingerprint]))
    else:
        cached.write_bytes(b"PK\x03\x04 not a zip")
    with caplog.at_level(logging.WARNING):
        again = load_dataset(str(path))
    assert np.array_equal(again.items, clean.items) and np.array_equal(again.user_tokens, clean.user_tokens)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_the_checksum_covers_dtype_shape_and_bytes() -> None:
    a = np.arange(12, dtype=np.int64)
    assert array_digest(a) == array_digest(a.copy())
    assert array_digest(a) != array_digest(a.astype(np.int32))
    assert array_digest(a) != array_digest(a.reshape(3, 4))
    b = a.copy()
    b[5] = 0
    assert array_digest(a) != array_digest(b)
    s = np.array(["x", "yy"])
    assert array_digest(s) != array_digest(np.array(["x", "yz"]))


def test_evaluate_gives_the_same_metrics_after_the_cache_was_edited(tmp_path: Path) -> None:
    """The reported bug end to end: a validly saved edit of the cache changed evaluate's HR@10."""
    path = write_csv(tmp_path / "ev.csv", successor_sequences(120, 20, seed=1))
    results = train("sasrec", str(path), tmp_path / "run", overrides=TINY)
    cached = cache_file_of("ev")
    with np.load(cached) as z:
        items = z["items"].copy()
    rng = np.random.default_rng(0)
    items[:] = rng.permutation(items)
    rewrite_npz(cached, items=items)
    again = evaluate_run(tmp_path / "run")
    assert again["test"] == pytest.approx(results["test"], abs=1e-9)


# --- duplicate events ---------------------------------------------------------------------------
def test_a_file_without_duplicates_keeps_the_fingerprint_of_earlier_versions(tmp_path: Path) -> None:
    """Existing runs and checkpoints record this fingerprint: it must not move."""
    path = write_csv(tmp_path / "same.csv", successor_sequences(40, 20, seed=3))
    key = f"v1-csv-{sha256_file(path)}-[5,inf)-[5,inf)"
    expected = hashlib.sha256(key.encode()).hexdigest()[:20]
    assert load_dataset(str(path)).fingerprint == expected
    assert load_dataset(str(path), duplicate_events="keep").fingerprint == expected


def test_exact_duplicates_are_dropped_with_one_warning_and_reported(tmp_path: Path, caplog) -> None:
    seqs = successor_sequences(40, 20, seed=3)
    once = load_dataset(str(write_csv(tmp_path / "once.csv", seqs)))
    with caplog.at_level(logging.WARNING):
        twice = load_dataset(str(write_csv(tmp_path / "twice.csv", seqs, twice=True)))
    n_events = sum(map(len, seqs))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"dropped {n_events} duplicate events" in warnings[0], warnings
    assert np.array_equal(twice.items, once.items) and np.array_equal(twice.offsets, once.offsets)
    assert twice.fingerprint != once.fingerprint  # a run trained on the doubled file is not this data
    stats = twice.stats()
    assert stats["duplicate_events"] == n_events and stats["duplicates"] == "dropped"
    assert once.stats()["duplicate_events"] == 0 and once.stats()["duplicates"] == "none"
    cached = load_dataset(str(tmp_path / "twice.csv"))  # from the cache: the same report
    assert cached.stats() == stats
    kept = load_dataset(str(tmp_path / "twice.csv"), duplicate_events="keep")
    assert kept.n_interactions == 2 * once.n_interactions and kept.stats()["duplicates"] == "kept"


def test_only_exact_duplicates_are_dropped(tmp_path: Path) -> None:
    """Same user and item at another time is a real repeat; the first of a group is the one kept."""
    rows = ["user,item,timestamp"]
    for u in range(1, 7):
        rows += [f"{u},{i},{t}" for t, i in enumerate([1, 2, 3, 4, 5, 1])]
    rows += ["1,9,100", "1,9,100", "2,9,100"]  # user 1 has item 9 twice at 100: one is a duplicate
    path = tmp_path / "rep.csv"
    path.write_text("\n".join(rows) + "\n")
    data = load_dataset(str(path), user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)")
    assert data.duplicate_events == 1
    assert data.n_interactions == 6 * 6 + 2
    assert data.stats()["repeated_items"] == 6  # every user's item 1, seen again at the end


def test_files_without_timestamps_report_repeats_and_drop_nothing(tmp_path: Path, caplog) -> None:
    seqs = successor_sequences(40, 20, seed=3)
    with caplog.at_level(logging.WARNING):
        data = load_dataset(str(write_csv(tmp_path / "untimed.csv", seqs, times=False, twice=True)))
    assert data.n_interactions == 2 * sum(map(len, seqs))
    stats = data.stats()
    assert stats["duplicate_events"] == "n/a (no timestamps)" and stats["repeated_items"] == sum(map(len, seqs))
    assert not any("duplicate" in r.getMessage() for r in caplog.records)


def test_doubled_file_trains_to_the_same_metrics_as_the_clean_one(tmp_path: Path) -> None:
    """The reported bug: every row twice gave test HR@10 = 1.000 (each target repeated the last item)."""
    seqs = successor_sequences(120, 20, seed=1)
    rng = np.random.default_rng(0)
    seqs = [list(rng.permutation(s)) for s in seqs]  # no learnable pattern: honest HR@10 is low
    clean = train("sasrec", str(write_csv(tmp_path / "c.csv", seqs)), tmp_path / "clean", overrides=TINY)
    doubled = train("sasrec", str(write_csv(tmp_path / "d.csv", seqs, twice=True)), tmp_path / "doubled",
                    overrides=TINY)
    assert doubled["test"] == pytest.approx(clean["test"], abs=1e-9)
    assert doubled["test"]["hit@10"] < 0.9
    assert doubled["dataset"]["duplicate_events"] == sum(map(len, seqs))


def test_a_run_trained_with_duplicates_kept_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A run made before duplicates were dropped recorded the kept-duplicates fingerprint: it is
    refused with the reason, not evaluated on other data, and not called a changed file."""
    path = write_csv(tmp_path / "dup.csv", successor_sequences(80, 20, seed=1), twice=True)
    run = tmp_path / "run"
    train("sasrec", str(path), run, overrides={**TINY, "duplicate_events": "keep"})
    evaluate_run(run)  # kept on purpose: loads
    # make it look like a run of mlsa4rec 0.2: no duplicate_events in its config
    from mlsa4rec.runs import directory
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["duplicate_events"]
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    manifest = json.loads((run / directory.MANIFEST).read_text())
    manifest["files"]["config.yaml"] = {"bytes": (run / "config.yaml").stat().st_size,
                                        "sha256": sha256_file(run / "config.yaml")}
    (run / directory.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MLSA4RecError, match=r"duplicate events .* kept.*retrain.*--set duplicate_events=keep"):
        evaluate_run(run)


def test_duplicate_events_setting_is_checked(tmp_path: Path, capsys) -> None:
    path = write_csv(tmp_path / "x.csv", successor_sequences(30, 10, seed=1))
    with pytest.raises(ConfigError, match="duplicate_events must be one of drop, keep"):
        train("sasrec", str(path), tmp_path / "run", overrides={**TINY, "duplicate_events": "maybe"})
    assert main(["data", "stats", str(path), "--set", "duplicate_events=maybe"]) == 2
    assert "duplicate_events" in capsys.readouterr().err
    with pytest.raises(MLSA4RecError):
        load_sequences(path, "csv", "x", duplicate_events="maybe")


def test_data_stats_reports_duplicates(tmp_path: Path, capsys) -> None:
    seqs = successor_sequences(30, 10, seed=1)
    path = write_csv(tmp_path / "st.csv", seqs, twice=True)
    assert main(["data", "stats", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["duplicate_events"] == sum(map(len, seqs)) and stats["duplicates"] == "dropped"
    assert main(["data", "stats", str(path), "--json", "--set", "duplicate_events=keep"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert kept["duplicates"] == "kept" and kept["interactions"] == 2 * stats["interactions"]
    shutil.rmtree(cache_dir() / "processed", ignore_errors=True)


@pytest.mark.parametrize("spelling, changed", [
    ("spaces around values", True),      # 0.2 kept " 2" as an id apart from "2": other data now
    ("spaces in the header", False),     # 0.2 read it alike: the same data, the same fingerprint
    ("byte-order mark", False),          # 0.2 could not read its header: no run of it exists
    ("plain", False),
])
def test_a_csv_gets_a_new_fingerprint_only_where_earlier_versions_read_other_ids(tmp_path: Path, spelling: str,
                                                                                  changed: bool) -> None:
    """Earlier versions kept spaces around CSV values as part of the ids; a file they read into other
    ids is other data now, so their runs must not match it; any other file keeps its fingerprint."""
    seqs = successor_sequences(40, 20, seed=3)
    clean = load_dataset(str(write_csv(tmp_path / "clean.csv", seqs)))
    text = write_csv(tmp_path / "x.csv", seqs).read_text()
    text = {"spaces around values": text.replace(",", ", "),
            "spaces in the header": text.replace("user,item,timestamp", "user, item, timestamp"),
            "byte-order mark": "\ufeff" + text, "plain": text}[spelling]
    path = tmp_path / "odd.csv"
    path.write_bytes(text.encode())
    odd = load_dataset(str(path))
    assert np.array_equal(odd.items, clean.items) and np.array_equal(odd.user_tokens, clean.user_tokens)
    old_key = f"v1-csv-{sha256_file(path)}-[5,inf)-[5,inf)"
    assert (odd.fingerprint != hashlib.sha256(old_key.encode()).hexdigest()[:20]) == changed


def test_other_files_earlier_versions_read_into_other_data_get_a_new_fingerprint(tmp_path: Path) -> None:
    """A byte-order mark before an .inter file's first column, `timestamp`, hid that column from
    0.2 (file order was used); a quoted CSV id with a space inside is now stripped."""
    from mlsa4rec.data.readers import read_csv, read_inter, read_user_lines

    inter = tmp_path / "t.inter"
    inter.write_text("\ufefftimestamp:float\tuser_id:token\titem_id:token\n2\tu\ti\n1\tu\tj\n")
    assert read_inter(inter).normalised and read_inter(inter).time.tolist() == [2.0, 1.0]
    inter.write_text("\ufeffuser_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\n")
    assert not read_inter(inter).normalised  # 0.2 could not read it: nothing to protect
    csv = tmp_path / "q.csv"
    csv.write_text('1,"a ",1\n1,a,2\n2,b\xa0,3\n2,b,4\n')
    read = read_csv(csv)
    assert read.normalised and read.item.tolist() == ["a", "a", "b\xa0", "b"]  # only spaces and tabs go
    txt = tmp_path / "z.txt"
    txt.write_text("000000000000000000002 1 2 3\n")  # 0.2 read it: long, but a 64-bit integer
    assert read_user_lines(txt).user.tolist() == [2, 2, 2]


def test_a_cache_that_cannot_be_read_is_rebuilt_not_called_the_data_file(tmp_path: Path, monkeypatch,
                                                                          caplog) -> None:
    """A cache folder or file the user may not read is a missing cache (rebuilt, one warning), never
    an error that names the cache file as the data file."""
    path = write_csv(tmp_path / "perm.csv", successor_sequences(40, 20, seed=3))
    clean = load_dataset(str(path))
    processed = str(cache_dir() / "processed")

    def refuse(self) -> bool:
        if str(self).startswith(processed):
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    original = Path.is_file
    monkeypatch.setattr(Path, "is_file", refuse)
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda f, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if str(f).startswith(processed) else real_load(f, *a, **k))
    with caplog.at_level(logging.WARNING):
        again = load_dataset(str(path))
    assert np.array_equal(again.items, clean.items)
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def _is_mapped(a: np.ndarray) -> bool:
    base = a
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    return base is not None


@pytest.mark.parametrize("damage", [None, "items"])
def test_a_large_cache_is_memory_mapped_and_still_verified(tmp_path: Path, monkeypatch, caplog, damage) -> None:
    import mlsa4rec.data.dataset as dataset

    path = write_csv(tmp_path / "mapped.csv", successor_sequences(40, 15, seed=5))
    built = load_dataset(str(path))
    assert not _is_mapped(built.items)
    monkeypatch.setattr(dataset, "MAP_BYTES", 0)  # every array counts as large
    cached = cache_file_of("mapped")
    if damage:
        with np.load(cached) as z:
            items = z["items"].copy()
        items[3] = items[4]
        rewrite_npz(cached, items=items)
    with caplog.at_level(logging.WARNING):
        again = load_dataset(str(path))
    assert np.array_equal(again.items, built.items) and np.array_equal(again.offsets, built.offsets)
    assert np.array_equal(again.item_tokens, built.item_tokens) and np.array_equal(again.user_tokens, built.user_tokens)
    if damage:  # refused, rebuilt from the file (in memory), one warning
        assert "checksum mismatch" in caplog.text and not _is_mapped(again.items)
    else:
        assert _is_mapped(again.items) and not again.items.flags.writeable and caplog.text == ""
