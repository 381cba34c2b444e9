"""What the machine and odd files throw at the command line (issue 23): names near the file
system's limits, files the user may not read, devices the machine lacks, CSV spellings, broken
output streams, the data checksum a run records, and a run hidden by an interrupted --overwrite.

Each test reproduces one defect (it failed before its fix); docs/reliability.md names the promise
each one proves. Unreadable files are simulated by making ``open`` refuse them, so the tests hold
when they run as root (who may read everything).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from conftest import BrokenStream
from mlsa4rec.cli import main
from mlsa4rec.data.readers import MAX_ID_CHARS, read_csv, read_inter
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.runs import directory
from mlsa4rec.training.run import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--set", "epochs=1", "--set", "hidden_size=8", "--set", "inner_size=8", "--set", "n_heads=1",
        "--set", "n_layers=1", "--set", "MAX_ITEM_LIST_LENGTH=6", "--set", "train_batch_size=64",
        "--set", "eval_batch_size=64"]
SMALL = {"hidden_size": 8, "inner_size": 8, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 6, "epochs": 1,
         "train_batch_size": 64, "eval_batch_size": 64}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, err: str, *needles: str) -> str:
    """The command failed as a person should see it: exit 2, one ``error:`` line holding every needle."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err and "usage:" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def deny_reading(monkeypatch, victims: Iterable[Path]) -> None:
    """``open`` (builtins, io, os) refuses the ``victims`` with EACCES, as for a file of another user."""
    denied = {os.path.abspath(v) for v in victims}

    def check(file) -> None:
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(file)) in denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(file))

    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def guarded_open(file, *args, **kwargs):
        check(file)
        return real_open(file, *args, **kwargs)

    def guarded_io_open(file, *args, **kwargs):
        check(file)
        return real_io_open(file, *args, **kwargs)

    def guarded_os_open(path, *args, **kwargs):
        check(path)
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_io_open)
    monkeypatch.setattr(os, "open", guarded_os_open)


@pytest.fixture
def finished_run(successor_file: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    train("sasrec", str(successor_file), out, overrides=SMALL)
    return out


# --- names near the file system's limits --------------------------------------------------------

def test_output_dir_names_too_long_for_the_file_system_are_refused_before_training(capsys, successor_file: Path,
                                                                                  tmp_path: Path,
                                                                                  monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = name_max - len(directory.replaced_name(Path("x"), 10 ** 7 - 1, "f" * 8)) + 1  # room for every sibling
    before = tree(tmp_path)
    for name in ("a" * (longest + 1), "a" * (name_max - 8), "a" * name_max, "a" * (name_max + 1), "é" * 120,
                 "/".join(["b" * 200] * 25)):
        code, _, err = cli(capsys, "train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir",
                           name, *TINY)
        one_error(code, err, "--output-dir", "shorter")
        assert tree(tmp_path) == before  # refused before anything was created or trained
    # an existing run whose name leaves no room for '.NAME.PID.TOKEN.replaced': refused before training
    existing = tmp_path / ("c" * (name_max - 12))
    existing.mkdir()
    (existing / "manifest.json").write_text("{}")
    code, _, err = cli(capsys, "train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir",
                       existing.name, "--overwrite", *TINY)
    one_error(code, err, f"at most {longest} bytes")
    assert not list(tmp_path.glob(".c*"))
    # the longest name that fits trains and publishes, --overwrite included
    for _ in range(2):
        code, _, err = cli(capsys, "train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir",
                           "d" * longest, "--overwrite", *TINY)
        assert code == 0, err
    assert (tmp_path / ("d" * longest) / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_every_derived_name_is_checked_against_the_limits(tmp_path: Path, monkeypatch) -> None:
    """With a small NAME_MAX or PATH_MAX the longest derived name or path decides, not NAME itself."""
    out = tmp_path / "run"
    monkeypatch.setattr(directory, "_fs_limits", lambda path: (len(".run.9999999.ffffffff.replaced"), 4096))
    directory.check_name_lengths(out)  # exactly fits
    monkeypatch.setattr(directory, "_fs_limits", lambda path: (len(".run.9999999.ffffffff.replaced") - 1, 4096))
    with pytest.raises(MLSA4RecError, match="may have at most 2 bytes"):
        directory.check_name_lengths(out)
    deepest = len(str(tmp_path)) + len("/.run.9999999.ffffffff.replaced/.model.safetensors.xxxxxxxx.tmp") + 1
    monkeypatch.setattr(directory, "_fs_limits", lambda path: (255, deepest))
    directory.check_name_lengths(out)
    monkeypatch.setattr(directory, "_fs_limits", lambda path: (255, deepest - 1))
    with pytest.raises(MLSA4RecError, match="PATH_MAX"):
        directory.check_name_lengths(out)


# --- files the user may not read -----------------------------------------------------------------

def test_an_unreadable_data_file_is_one_error_line_in_every_command(capsys, successor_file: Path,
                                                                    finished_run: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    deny_reading(monkeypatch, [successor_file])
    out = tmp_path / "new"
    for argv in (["data", "stats", str(successor_file)],
                 ["train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir", str(out), *TINY],
                 ["evaluate", "--run-dir", str(finished_run)]):
        code, _, err = cli(capsys, *argv)
        one_error(code, err, "cannot read data file", "Permission denied", "permissions")
    assert not out.exists() and not list(tmp_path.glob(".new*"))


@pytest.mark.parametrize("victim", ["manifest.json", "model.safetensors", "config.yaml", "items.json"])
def test_an_unreadable_run_file_is_not_called_damaged(capsys, finished_run: Path, monkeypatch, victim: str) -> None:
    deny_reading(monkeypatch, [finished_run / victim])
    for argv in (["evaluate", "--run-dir", str(finished_run)],
                 ["recommend", "--run-dir", str(finished_run), "--history", "1 2 3"],
                 ["compare", str(finished_run), str(finished_run), "--resamples", "100"]):
        code, _, err = cli(capsys, *argv)
        line = one_error(code, err, victim, "Permission denied")
        assert "damaged" not in line


def test_any_os_error_a_person_can_fix_is_one_line_naming_the_file(capsys, monkeypatch) -> None:
    import mlsa4rec.cli as cli_module

    for exc, needle in ((PermissionError(errno.EACCES, "Permission denied", "/srv/runs/x"), "'/srv/runs/x'"),
                        (IsADirectoryError(errno.EISDIR, "Is a directory", "/srv/data"), "pass a file"),
                        (OSError(errno.EIO, "Input/output error", "/mnt/disk/f"), "input/output error"),
                        (OSError(errno.ENOSPC, "No space left on device"), "free disk space")):
        def boom(args, exc=exc):
            raise exc

        monkeypatch.setitem(cli_module.COMMANDS, "models", boom)
        code, _, err = cli(capsys, "models")
        one_error(code, err, needle)
    for bug in (OSError(errno.EINVAL, "Invalid argument"), ValueError("a bug")):  # bugs keep their traceback
        def broken(args, bug=bug):
            raise bug

        monkeypatch.setitem(cli_module.COMMANDS, "models", broken)
        with pytest.raises(type(bug)):
            main(["models"])


# --- devices --------------------------------------------------------------------------------------

BAD_DEVICES = ["mps", "tpu", "meta", "CPU", "", "cuda", "cuda:7", "cuda:x", "cpu:0"]


@pytest.mark.parametrize("gpus", [0, 1])
def test_a_device_this_machine_lacks_is_refused_before_any_work(capsys, tmp_path: Path, monkeypatch,
                                                                gpus: int) -> None:
    """train (--set device=), recommend and serve (--device): one line listing the devices that exist,
    before a data file or a run directory is even looked at (both are missing here)."""
    # the machine is simulated either way (no GPU, or one), and never has Apple's mps
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    have = "cpu, cuda, cuda:0" if gpus else "cpu"
    missing_run = str(tmp_path / "no-run")
    for device in BAD_DEVICES:
        if gpus and device == "cuda":
            continue
        for argv in (["train", "--model", "sasrec", "--dataset", str(tmp_path / "no.txt"), "--output-dir",
                      str(tmp_path / "out"), "--set", f"device={device}"],
                     ["recommend", "--run-dir", missing_run, "--history", "1", "--device", device],
                     ["serve", "--run-dir", missing_run, "--device", device]):
            code, _, err = cli(capsys, *argv)
            one_error(code, err, have)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_trained_on_a_device_this_machine_lacks_is_evaluated_on_one_it_has(capsys, finished_run: Path,
                                                                                 caplog) -> None:
    config = finished_run / "config.yaml"
    config.write_text(config.read_text().replace("device: auto", "device: cuda:3"))
    directory.write_manifest(finished_run)
    code, out, err = cli(capsys, "evaluate", "--run-dir", str(finished_run), "--json")
    assert code == 0, err
    assert json.loads(out)["test"] and "device=cuda:3, which this machine does not have" in caplog.text
    caplog.clear()  # serving too: `recommend` with the default --device auto scores on a device it has
    code, out, err = cli(capsys, "recommend", "--run-dir", str(finished_run), "--history", "1 2 3", "--json")
    assert code == 0 and json.loads(out)["recommendations"], err
    assert "device=cuda:3, which this machine does not have" in caplog.text


# --- odd data files -------------------------------------------------------------------------------

ROWS = "".join(f"{u},{i},{t}\n" for u in range(1, 4) for t, i in enumerate(range(1, 7)))


@pytest.mark.parametrize("text", [
    "\ufeffuser,item,timestamp\n" + ROWS,
    '"user","item","timestamp"\n' + ROWS,
    '\ufeff"User_ID", "Item_ID" ,"Time"\r\n' + ROWS.replace("\n", "\r\n"),
    "'user','item','timestamp'\n" + ROWS,
    "\ufeff" + ROWS,
    "user, item, timestamp\n" + ROWS.replace(",", ", "),
    '"user", "item", "timestamp"\n' + "".join(", ".join(f'"{v}"' for v in row.split(",")) + "\n"
                                              for row in ROWS.splitlines()),
])
def test_csv_with_a_byte_order_mark_or_quoted_header_reads_correctly(tmp_path: Path, text: str) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(text.encode("utf-8"))
    inter = read_csv(path)
    assert inter.user.tolist() == [1] * 6 + [2] * 6 + [3] * 6
    assert inter.item.tolist() == list(range(1, 7)) * 3 and inter.time.tolist() == list(range(6)) * 3
    inter_file = tmp_path / "d.inter"
    inter_file.write_bytes("\ufeffuser_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n".encode())
    assert read_inter(inter_file).item.tolist() == [2]


def test_odd_data_files_get_messages_that_say_what_is_wrong(capsys, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    long_id = tmp_path / "long.csv"
    long_id.write_text("user,item,timestamp\n" + ROWS + "1," + "x" * 10 ** 6 + ",9\n")
    long_txt = tmp_path / "long.txt"
    long_txt.write_text("1 2 3 4 5 6\n2 " + "7" * 10 ** 6 + " 3\n")
    long_time = tmp_path / "time.csv"
    long_time.write_text("user,item,timestamp\n" + ROWS + "1,2," + "y" * 10 ** 6 + "\n")
    gz = tmp_path / "cut.txt.gz"
    import gzip

    raw = bytearray(gzip.compress(b"1 2 3 4 5 6\n" * 50))
    raw[20] ^= 0xFF
    gz.write_bytes(bytes(raw))
    cases = [(folder, "is a directory, not a data file"), (empty, "is empty (0 bytes)"),
             (long_id, f"line 20: the item id is 1,000,000 characters long; ids may have at most {MAX_ID_CHARS}"),
             (long_txt, "line 2: the id '7777"), (long_time, "line 20: timestamp 'yyyy"),
             (gz, "damaged or incomplete gzip file")]
    for path, needle in cases:
        code, _, err = cli(capsys, "data", "stats", str(path))
        line = one_error(code, err, needle)
        assert len(line) < 400  # a 10**6-character token is shown cut short


# --- the data checksum a run records --------------------------------------------------------------

def test_results_record_the_data_files_sha256_and_a_changed_file_names_both(capsys, successor_file: Path,
                                                                            finished_run: Path) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    digest = hashlib.sha256(successor_file.read_bytes()).hexdigest()
    assert results["data_sha256"] == digest
    successor_file.write_text(successor_file.read_text() + "301 1 2 3 4 5 6\n")
    code, _, err = cli(capsys, "evaluate", "--run-dir", str(finished_run))
    one_error(code, err, "data_sha256", digest[:16], hashlib.sha256(successor_file.read_bytes()).hexdigest()[:16])


def test_a_run_recorded_before_data_sha256_still_loads(capsys, successor_file: Path, finished_run: Path) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    del results["data_sha256"]
    (finished_run / "results.json").write_text(json.dumps(results))
    directory.write_manifest(finished_run)
    code, _, err = cli(capsys, "evaluate", "--run-dir", str(finished_run))
    assert code == 0, err
    successor_file.write_text(successor_file.read_text() + "301 1 2 3 4 5 6\n")
    code, _, err = cli(capsys, "evaluate", "--run-dir", str(finished_run))
    one_error(code, err, "predates data_sha256", "restore the original file")


# --- a run hidden by an interrupted --overwrite ----------------------------------------------------

def test_a_run_hidden_by_an_interrupted_overwrite_is_named_by_the_next_command(capsys, successor_file: Path,
                                                                               finished_run: Path, caplog,
                                                                               monkeypatch) -> None:
    old_weights = (finished_run / "model.safetensors").read_bytes()

    def killed(old: Path) -> None:  # the process dies after the new run is in place, before deleting the old
        raise KeyboardInterrupt

    monkeypatch.setattr(directory, "_delete_replaced", killed)
    with pytest.raises(KeyboardInterrupt):
        train("sasrec", str(successor_file), finished_run, overrides={**SMALL, "seed": 9}, overwrite=True)
    monkeypatch.undo()
    (hidden,) = finished_run.parent.glob(".run.*.replaced")
    assert (hidden / "model.safetensors").read_bytes() == old_weights
    for argv in (["evaluate", "--run-dir", str(finished_run)],
                 ["recommend", "--run-dir", str(finished_run), "--history", "1 2"],
                 ["train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir", str(finished_run),
                  "--overwrite", *TINY]):
        caplog.clear()
        code, _, err = cli(capsys, *argv)
        assert code == 0, err
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and str(hidden) in
                    r.getMessage()]
        assert len(warnings) == 1 and "rm -r" in warnings[0] and "mv " in warnings[0], caplog.text
    # killed between the two renames: no run in place, the old one hidden, the new one finished in its stage
    shutil.rmtree(hidden)
    stage = directory.staging_dir(finished_run)
    finished_run.rename(stage)
    shutil.copytree(stage, hidden)
    caplog.clear()
    for command in ("evaluate", "recommend"):
        caplog.clear()
        argv = [command, "--run-dir", str(finished_run)] + (["--history", "1 2"] if command == "recommend" else [])
        code, _, err = cli(capsys, *argv)
        one_error(code, err, "not a run directory")
        assert str(hidden) in caplog.text, command


# --- the command line's own errors and broken output streams ---------------------------------------

@pytest.mark.parametrize("argv", [["train", "--model"], ["nope"], [], ["recommend", "--run-dir", "x", "-k", "a",
                                                                         "--history", "1"],
                                  ["evaluate", "--run-dir", "x", "--history", "sometimes"], ["models", "--bogus"]])
def test_argparse_errors_are_one_error_line(capsys, argv: list[str]) -> None:
    code, out, err = cli(capsys, *argv)
    one_error(code, err, "--help")
    assert out == ""


def test_a_closed_pipe_or_a_full_disk_behind_stdout_is_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mlsa4rec", "models"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first byte (`mlsa4rec models | true`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err
    with open("/dev/full", "w") as full:
        done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: No space left on device; free disk space")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr




def test_an_input_output_error_on_stdout_is_one_error_line(capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", BrokenStream(OSError(errno.EIO, "Input/output error"), 0))
    code = main(["models"])
    err = capsys.readouterr().err
    one_error(code, err, "Input/output error; the disk or file system reported")


def test_ratings_dat_ids_too_large_to_keep_apart_are_refused(tmp_path: Path) -> None:
    """Found by the fuzz module: ratings.dat ids are read as numbers, and 2**53 or more would merge
    distinct ids (or, past 2**63, turn into one negative id) without a word."""
    from mlsa4rec.data.readers import read_ratings_dat

    for big in ("99999999999999999999", "9007199254740993", "1e300"):
        path = tmp_path / "ratings.dat"
        path.write_text(f"1::2::5::10\n{big}::3::5::11\n")
        with pytest.raises(MLSA4RecError, match=r"line 2: user id .* is too large for ratings.dat"):
            read_ratings_dat(path)
    path.write_text("1::2::5::10\n9007199254740991::3::5::11\n")  # the largest that stays exact
    assert read_ratings_dat(path).user.tolist() == [1, 2 ** 53 - 1]
