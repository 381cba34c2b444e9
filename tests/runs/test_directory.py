"""The run directory never loses a user's data: what --overwrite may delete, symlinks, the working
directory, publishing, checksums of saved weights, and the failures a machine can throw at a run.

Each test reproduces one defect of issue 11 (it failed before the fix); docs/reliability.md
names the promise each one proves.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from mlsa4rec.cli import main
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation.runs import compare_runs, evaluate_run
from mlsa4rec.runs import checkpoint
from mlsa4rec.runs.directory import (
    MANIFEST,
    RUN,
    RUN_FILES,
    TENSORBOARD,
    check_output_dir,
    publish_stage,
    read_manifest,
    staging_dir,
    verify_run,
    write_manifest,
)
from mlsa4rec.serving.export import EXPORT, EXPORT_JSON
from mlsa4rec.training.run import train

SMALL = {"hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1, "MAX_ITEM_LIST_LENGTH": 8,
         "epochs": 1, "train_batch_size": 64, "seed": 3}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories): a snapshot to compare."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def one_error(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


# --- 1. --overwrite deletes only what mlsa4rec wrote -----------------------------------------------

def test_overwrite_never_deletes_a_directory_mlsa4rec_did_not_write(successor_file: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("epochs: 1\n")
    (project / "model.py").write_text("print('years of work')\n")
    (project / "data").mkdir()
    (project / "data" / "x.csv").write_text("1,2,3\n")
    sub = project / "sub"
    sub.mkdir()
    (sub / "config.yaml").write_text("epochs: 1\n")
    (sub / "notes.txt").write_text("keep me")
    before = tree(tmp_path)
    monkeypatch.chdir(project)
    for out, needle in ((".", "is the working directory"), ("..", "a parent of the working directory"),
                        (str(tmp_path), "a parent of the working directory"),
                        ("sub", "no manifest.json")):
        with pytest.raises(MLSA4RecError, match=needle):
            train("sasrec", str(successor_file), out, overrides=SMALL, overwrite=True)
    assert tree(tmp_path) == before


def test_overwrite_refuses_a_run_holding_foreign_files_and_replaces_a_clean_one(successor_file: Path,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    train("sasrec", str(successor_file), out, overrides=SMALL)
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(n for n in manifest["files"] if not n.startswith("tensorboard/")) == [
        "config.yaml", "items.json", "model.safetensors", "results.json", "train.log"]
    (out / "analysis.ipynb").write_text("my notes")
    with pytest.raises(MLSA4RecError, match=r"left alone: it holds analysis.ipynb, which mlsa4rec did not write"):
        train("sasrec", str(successor_file), out, overrides=SMALL, overwrite=True)
    assert (out / "analysis.ipynb").read_text() == "my notes"
    (out / "analysis.ipynb").unlink()
    result = train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 2, "stopping_step": 9},
                   overwrite=True)
    assert result["epochs_run"] == 2 and result["run_dir"] == str(out.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", successor_file.name]


def test_a_manifest_naming_a_path_outside_the_run_is_refused(successor_file: Path, tmp_path: Path) -> None:
    """The manifest steers what --overwrite deletes: a name with a path in it must never be trusted."""
    out = tmp_path / "run"
    train("sasrec", str(successor_file), out, overrides=SMALL)
    (tmp_path / "precious.txt").write_text("mine")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["../precious.txt"] = {"bytes": 4, "sha256": "0" * 64}
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MLSA4RecError, match="not an mlsa4rec run manifest"):
        train("sasrec", str(successor_file), out, overrides=SMALL, overwrite=True)
    with pytest.raises(MLSA4RecError, match="not an mlsa4rec run manifest"):
        evaluate_run(out)
    assert (tmp_path / "precious.txt").read_text() == "mine"


def test_a_staging_directory_mlsa4rec_did_not_make_is_left_alone(successor_file: Path, tmp_path: Path) -> None:
    stage = staging_dir(tmp_path / "run")
    stage.mkdir()
    (stage / "mine.txt").write_text("not a run")
    with pytest.raises(MLSA4RecError, match="was not made by mlsa4rec"):
        train("sasrec", str(successor_file), tmp_path / "run", overrides=SMALL, overwrite=True)
    assert (stage / "mine.txt").read_text() == "not a run"


# --- 2. a symlinked --output-dir ----------------------------------------------------------------

def test_symlinked_output_dir_publishes_into_its_target(successor_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "disk" / "run"
    target.mkdir(parents=True)
    link = tmp_path / "run"
    link.symlink_to(target, target_is_directory=True)
    result = train("sasrec", str(successor_file), link, overrides=SMALL)
    assert result["run_dir"] == str(target.resolve())
    assert link.is_symlink() and (target / MANIFEST).is_file() and (link / "results.json").is_file()
    assert not list(tmp_path.rglob(".*.partial"))
    before = tree(target)
    with pytest.raises(MLSA4RecError, match="never deletes through a link"):
        train("sasrec", str(successor_file), link, overrides=SMALL, overwrite=True)
    assert tree(target) == before
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(MLSA4RecError, match="symbolic link .* does not exist"):
        train("sasrec", str(successor_file), dangling, overrides=SMALL)


# --- 3. every refusal happens before training; a finished run is never hidden -----------------------

def test_output_dir_dot_is_refused_before_training(successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    steps = []
    with pytest.raises(MLSA4RecError, match="working directory"):
        train("sasrec", str(successor_file), ".", overrides=SMALL, on_step=lambda e, s: steps.append(s))
    assert steps == [] and sorted(tmp_path.iterdir()) == sorted([empty, successor_file])
    assert not list(empty.iterdir())


def test_a_run_whose_output_dir_fills_up_during_training_is_published_beside_it(successor_file: Path,
                                                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"

    def someone_writes_there(epoch: int, step: int) -> None:
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("not yours")

    result = train("sasrec", str(successor_file), out, overrides=SMALL, on_step=someone_writes_there)
    assert result["run_dir"] == str((tmp_path / "run-1").resolve())
    assert (out / "theirs.txt").read_text() == "not yours" and (tmp_path / "run-1" / MANIFEST).is_file()
    assert not list(tmp_path.glob(".*"))


# --- 5. weights (and every file a load reads) are verified ------------------------------------------

def test_a_flipped_bit_in_the_weights_is_refused_everywhere(capsys, successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train("sasrec", str(successor_file), out, overrides=SMALL)
    train("sasrec", str(successor_file), tmp_path / "base", overrides={**SMALL, "seed": 4})
    evaluate_run(out)
    weights = out / "model.safetensors"
    good = weights.read_bytes()
    flipped = bytearray(good)
    flipped[-7] ^= 0x04  # inside a tensor: safetensors itself would load it without a word
    weights.write_bytes(bytes(flipped))
    with pytest.raises(MLSA4RecError, match="model.safetensors' does not match the checksum"):
        evaluate_run(out)
    with pytest.raises(MLSA4RecError, match="does not match the checksum"):
        compare_runs([tmp_path / "base", out], n_resamples=100)
    one_error(*cli(capsys, "evaluate", "--run-dir", str(out)), "does not match the checksum")
    weights.write_bytes(good)
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("seed: 3", "seed: 5"))
    with pytest.raises(MLSA4RecError, match="config.yaml' does not match the checksum"):
        evaluate_run(out)


def test_only_a_run_older_than_manifests_loads_without_one(successor_file: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    first = train("sasrec", str(successor_file), out, overrides=SMALL)
    manifest = (out / MANIFEST).read_bytes()
    (out / MANIFEST).unlink()
    with pytest.raises(MLSA4RecError, match="manifest.json' is missing"):
        evaluate_run(out)  # a run of this version lost its manifest: nothing can be verified
    results = json.loads((out / "results.json").read_text())
    results["versions"]["mlsa4rec"] = "0.1.0"  # as written by mlsa4rec 0.1, before manifests
    (out / "results.json").write_text(json.dumps(results))
    with caplog.at_level("WARNING", logger="mlsa4rec"):
        again = evaluate_run(out)
    assert again["test"] == first["test"] and "cannot be verified" in caplog.text
    (out / MANIFEST).write_bytes(manifest)
    with pytest.raises(MLSA4RecError, match="results.json' does not match the checksum"):
        evaluate_run(out)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(MLSA4RecError, match="manifest.json' is damaged"):
        evaluate_run(out)


# --- 6. failures of the machine: memory, disk, a checkpoint that lacks a key ------------------------

@pytest.mark.parametrize("setting", ["hidden_size=10000000000", "MAX_ITEM_LIST_LENGTH=100000000000",
                                     "train_batch_size=100000000000", "eval_batch_size=100000000000"])
def test_a_run_too_big_for_memory_is_refused_before_allocating(capsys, successor_file: Path, tmp_path: Path,
                                                              setting: str) -> None:
    code, err = cli(capsys, "train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir",
                    str(tmp_path / "run"), "--set", setting, "--set", "epochs=1")
    one_error(code, err, "of memory")
    assert "lower hidden_size, MAX_ITEM_LIST_LENGTH" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [successor_file.name]


def test_running_out_of_memory_mid_run_is_one_error_line(capsys, successor_file: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    from mlsa4rec.training import trainer

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 98304000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(trainer, "cross_entropy", no_memory)
    code, err = cli(capsys, "train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir",
                    str(tmp_path / "run"), "--set", "epochs=1", "--set", "hidden_size=8", "--set", "n_heads=1")
    one_error(code, err, "ran out of memory")
    assert sorted(p.name for p in tmp_path.iterdir()) == [successor_file.name]


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(capsys, successor_file: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    calls = []
    real_fsync = os.fsync

    def full_disk_on_second_checkpoint(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", full_disk_on_second_checkpoint)
    out = tmp_path / "run"
    argv = ["train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir", str(out)]
    sets = [a for k, v in {**SMALL, "epochs": 3, "stopping_step": 9}.items() for a in ("--set", f"{k}={v}")]
    code, err = cli(capsys, *argv, *sets)
    one_error(code, err, "No space left on device")
    assert "the previous checkpoint is intact" in err and "--resume" in err
    path = staging_dir(out) / checkpoint.CHECKPOINT
    assert json.loads(checkpoint.load(path)["meta"])["progress"]["epoch"] == 2  # epoch 1's end, intact
    assert not [p for p in staging_dir(out).iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(checkpoint.os, "fsync", real_fsync)
    assert cli(capsys, *argv, *sets, "--resume")[0] == 0 and (out / MANIFEST).is_file()


def test_a_checkpoint_with_a_valid_checksum_but_a_missing_key_is_refused(capsys, successor_file: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 2},
              on_step=lambda e, s: (_ for _ in ()).throw(KeyboardInterrupt()) if e == 2 else None)
    path = staging_dir(out) / checkpoint.CHECKPOINT
    state = checkpoint.load(path)
    argv = ["train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir", str(out), "--resume"]
    sets = [a for k, v in {**SMALL, "epochs": 2}.items() for a in ("--set", f"{k}={v}")]
    for broken, needle in (({k: v for k, v in state.items() if k != "optimizer"}, "lacks optimizer"),
                           ({**state, "meta": json.dumps({k: v for k, v in json.loads(state["meta"]).items()
                                                          if k != "progress"})}, "lacks meta.progress"),
                           ({**state, "model": {"item_embedding.weight": torch.zeros(3, 3)}}, "does not fit")):
        checkpoint.save(path, broken)
        one_error(*cli(capsys, *argv, *sets), needle)
        assert path.is_file()  # the refusal kept the interrupted run
    checkpoint.save(path, state)
    assert cli(capsys, *argv, *sets)[0] == 0


# --- 7. silent wrong inputs --------------------------------------------------------------------------

def test_resume_and_overwrite_together_are_refused(successor_file: Path, tmp_path: Path) -> None:
    with pytest.raises(MLSA4RecError, match="pass only one"):
        train("sasrec", str(successor_file), tmp_path / "run", overrides=SMALL, resume=True, overwrite=True)
    assert list(tmp_path.iterdir()) == [successor_file]


def test_evaluate_refuses_an_unfinished_staging_directory(capsys, successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 2},
              on_step=lambda e, s: (_ for _ in ()).throw(KeyboardInterrupt()) if e == 2 else None)
    one_error(*cli(capsys, "evaluate", "--run-dir", str(staging_dir(out))), "has not finished")


# --- 8. messages -------------------------------------------------------------------------------------

def test_non_finite_loss_says_what_to_change(successor_file: Path, tmp_path: Path) -> None:
    with pytest.raises(MLSA4RecError) as info:
        train("sasrec", str(successor_file), tmp_path / "run",
              overrides={**SMALL, "epochs": 3, "learning_rate": 1e30, "checkpoint_steps": 1})
    message = str(info.value)
    assert "loss became" in message and "clip_grad_norm" in message and "lower learning_rate" in message
    assert "would diverge again" in message


def test_a_changed_data_file_does_not_mention_data_dir(successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    data = tmp_path / "data.txt"
    data.write_bytes(successor_file.read_bytes())
    train("sasrec", str(data), out, overrides=SMALL)
    data.write_text(data.read_text().replace("\n1 ", "\n1 1 ", 1) + "999 1 2 3 4 5 6\n")
    with pytest.raises(MLSA4RecError, match="differs from the data") as info:
        evaluate_run(out)
    assert "--data-dir" not in str(info.value) and "restore the original file" in str(info.value)



def _interrupt(successor_file: Path, out: Path, **kwargs) -> Path:
    """Train into ``out`` until epoch 2 starts, then stop as Ctrl-C would; the stage it leaves."""
    def stop(epoch: int, step: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 2}, on_step=stop, **kwargs)
    return staging_dir(out)


def test_a_refusal_after_the_stage_is_opened_deletes_nothing(successor_file: Path, tmp_path: Path) -> None:
    """--overwrite of an interrupted run with a setting the memory check refuses: the interrupted
    run's checkpoint is still there (the stage is emptied only once every check has passed)."""
    out = tmp_path / "run"
    stage = _interrupt(successor_file, out)
    before = tree(stage)
    with pytest.raises(MLSA4RecError, match="of memory"):
        train("sasrec", str(successor_file), out, overrides={**SMALL, "MAX_ITEM_LIST_LENGTH": 10 ** 11},
              overwrite=True)
    assert tree(stage) == before


def test_an_interrupted_overwrite_resumes_and_replaces_the_old_run(successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train("sasrec", str(successor_file), out, overrides=SMALL)
    old = json.loads((out / MANIFEST).read_text())
    _interrupt(successor_file, out, overwrite=True)
    (tmp_path / f".{out.name}.replaced").mkdir()  # a leftover of an older mlsa4rec: never in the way
    result = train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 2}, resume=True)
    assert result["resumed"] and result["run_dir"] == str(out.resolve()) and result["epochs_run"] == 2
    assert json.loads((out / MANIFEST).read_text()) != old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".run.replaced", "run", successor_file.name])


def test_a_finished_run_whose_publishing_was_cut_short_is_never_emptied(successor_file: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """A crash after the checkpoint is deleted but before the rename leaves a complete stage: later
    runs refuse it instead of clearing it, and say how to keep it."""
    import mlsa4rec.runs.directory as rundir_module

    out = tmp_path / "run"
    real_replace = os.replace

    def crash_on_publish(src, dst) -> None:
        if Path(src) == staging_dir(out.resolve()):
            raise KeyboardInterrupt  # the rename of the stage onto the run directory
        real_replace(src, dst)

    monkeypatch.setattr(rundir_module.os, "replace", crash_on_publish)
    with pytest.raises(KeyboardInterrupt):
        train("sasrec", str(successor_file), out, overrides=SMALL)
    monkeypatch.undo()
    stage = staging_dir(out)
    assert (stage / MANIFEST).is_file() and (stage / "model.safetensors").is_file()
    before = tree(stage)
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(MLSA4RecError, match="finished run .* publishing was interrupted"):
            train("sasrec", str(successor_file), out, overrides=SMALL, **kwargs)
    assert tree(stage) == before


# --- one publisher for every directory mlsa4rec replaces whole: a run's and an export's ---------------

def _finished_run(path: Path) -> None:
    path.mkdir()
    for name in RUN_FILES:
        (path / name).write_text(name)
    write_manifest(path)


def _finished_export(path: Path) -> None:
    path.mkdir()
    files = {}
    for name in ("encoder.onnx", "item_table.npy", "items.json"):
        (path / name).write_text(name)
        files[name] = {"bytes": len(name), "sha256": "0" * 64}
    (path / EXPORT_JSON).write_text(json.dumps({"kind": "mlsa4rec export", "version": 1, "files": files}))


KINDS = {"run": (RUN, _finished_run, "mlsa4rec", "--output-dir"),
         "export": (EXPORT, _finished_export, "mlsa4rec export", "output directory")}


@pytest.mark.parametrize("kind", KINDS)
def test_runs_and_exports_are_replaced_by_the_same_rules(kind: str, tmp_path: Path, caplog) -> None:
    """--overwrite refuses a directory holding a file its listing does not name, and replacing one
    deletes only the listed files of the old directory: a file that appears after the check is kept."""
    layout, finished, writer, option = KINDS[kind]
    out, stage = tmp_path / "out", tmp_path / ".out.partial"
    finished(out)
    finished(stage)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MLSA4RecError, match=f"already exists and is not empty; choose another {option} or pass"):
        publish_stage(stage, out, overwrite=False, layout=layout)
    with pytest.raises(MLSA4RecError, match=f"left alone: it holds notes.txt, which {writer} did not write; move it "
                                            f"away or choose another {option}$"):
        publish_stage(stage, out, overwrite=True, layout=layout)
    assert (out / "notes.txt").read_text() == "mine" and stage.is_dir()
    with pytest.raises(MLSA4RecError, match=f"exists and is not a directory; choose another {option}$"):
        check_output_dir(out / "notes.txt", overwrite=True, layout=layout)
    (out / "notes.txt").unlink()

    def read_then_a_file_appears(path: Path):  # the second read is of the old directory, moved aside
        listing = layout.read(path)
        if path != out:
            (path / "late.txt").write_text("mine too")
        return listing

    with caplog.at_level(logging.WARNING, logger="mlsa4rec"):
        publish_stage(stage, out, overwrite=True, layout=dataclasses.replace(layout, read=read_then_a_file_appears))
    assert not stage.exists() and (out / layout.listing).is_file()
    (old,) = tmp_path.glob(".out.*.replaced")
    assert [p.name for p in old.iterdir()] == ["late.txt"] and "still holds files" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_rename_puts_the_old_directory_back(kind: str, tmp_path: Path, monkeypatch) -> None:
    """No moment without one of the two on disk: the old directory returns when the stage cannot be renamed."""
    layout, finished, _, _ = KINDS[kind]
    out, stage = tmp_path / "out", tmp_path / ".out.partial"
    finished(out)
    finished(stage)
    before, real_replace = tree(out), os.replace

    def full_disk(src, dst) -> None:
        if Path(src) == stage:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        publish_stage(stage, out, overwrite=True, layout=layout)
    assert tree(out) == before and stage.is_dir() and not list(tmp_path.glob(".out.*.replaced"))


# --- the one subfolder a run may hold: tensorboard/ (issue 25) ---------------------------------------

def _run_with_tensorboard(path: Path) -> None:
    """A finished run whose tensorboard/ holds two event files, listed in its manifest."""
    path.mkdir()
    for name in RUN_FILES:
        (path / name).write_text(name)
    (path / TENSORBOARD).mkdir()
    for name in ("events.out.tfevents.1.host.1.0", "events.out.tfevents.2.host.2.0"):
        (path / TENSORBOARD / name).write_bytes(name.encode())
    write_manifest(path)


def test_a_run_with_tensorboard_files_verifies_loads_and_is_replaced_cleanly(successor_file: Path,
                                                                             tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    first = train("sasrec", str(successor_file), out, overrides=SMALL)
    events = sorted((out / TENSORBOARD).iterdir())
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert events and all(f"{TENSORBOARD}/{p.name}" in listed for p in events)
    assert evaluate_run(out)["test"] == pytest.approx(first["test"], abs=1e-9)
    good = events[0].read_bytes()
    events[0].write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(MLSA4RecError, match="tensorboard/events.* does not match the checksum"):
        evaluate_run(out)
    events[0].write_bytes(good)
    train("sasrec", str(successor_file), out, overrides=SMALL, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", successor_file.name]  # nothing hidden left behind
    now = sorted(p.name for p in (out / TENSORBOARD).iterdir())
    assert now and not set(now) & {p.name for p in events}
    assert sorted(n for n in json.loads((out / MANIFEST).read_text())["files"] if "/" in n) == \
        [f"{TENSORBOARD}/{n}" for n in now]
    verify_run(out)


def test_the_tensorboard_folder_of_a_replaced_run_goes_with_it(tmp_path: Path) -> None:
    out, stage = tmp_path / "out", tmp_path / ".out.partial"
    _run_with_tensorboard(out)
    _run_with_tensorboard(stage)
    publish_stage(stage, out, overwrite=True, layout=RUN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and len(list((out / TENSORBOARD).iterdir())) == 2


@pytest.mark.parametrize("intruder", ["file", "folder", "link", "linked folder"])
def test_a_foreign_entry_in_tensorboard_makes_overwrite_refuse(tmp_path: Path, intruder: str) -> None:
    out, stage = tmp_path / "out", tmp_path / ".out.partial"
    _run_with_tensorboard(out)
    _run_with_tensorboard(stage)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious.txt").write_text("mine")
    folder = out / TENSORBOARD
    if intruder == "file":
        (folder / "notes.txt").write_text("mine")
        shown = "tensorboard/notes.txt"
    elif intruder == "folder":
        (folder / "sub").mkdir()
        (folder / "sub" / "x").write_text("mine")
        shown = "tensorboard/sub/"
    elif intruder == "link":
        (folder / "notes.txt").symlink_to(tmp_path / "elsewhere" / "precious.txt")
        shown = "tensorboard/notes.txt"
    else:  # the folder itself replaced by a link to one holding the listed names
        for p in folder.iterdir():
            (tmp_path / "elsewhere" / p.name).write_bytes(p.read_bytes())
            p.unlink()
        folder.rmdir()
        folder.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        shown = "tensorboard"
        with pytest.raises(MLSA4RecError, match="tensorboard' is a symbolic link"):
            verify_run(out)
    before = tree(tmp_path)
    with pytest.raises(MLSA4RecError, match=f"left alone: it holds {shown}(,| which)"):
        publish_stage(stage, out, overwrite=True, layout=RUN)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", ["tensorboard/../x", "a/b/c", "tensorboard/a/b", "other/x", "tensorboard/",
                                  "tensorboard/..", "/tensorboard/x"])
def test_a_manifest_naming_a_path_other_than_a_tensorboard_file_is_refused(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    _run_with_tensorboard(out)
    (tmp_path / "x").write_text("mine")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"][name] = {"bytes": 4, "sha256": "0" * 64}
    (out / MANIFEST).write_text(json.dumps(manifest))
    before = tree(tmp_path)
    for refused in (lambda: read_manifest(out), lambda: verify_run(out),
                    lambda: check_output_dir(out, overwrite=True)):
        with pytest.raises(MLSA4RecError, match="not an mlsa4rec run manifest"):
            refused()
    assert tree(tmp_path) == before
