"""Checkpoints: the file format, resume after SIGKILL, the staging directory's rules, bad files.

Resumed runs are compared with uninterrupted ones *exactly*: on a CPU with a fixed thread count
every kernel is deterministic, the resumed run redraws the same batches from the saved sampler
state, skips the steps already done and restores every random state and the optimiser's moments
bit for bit, so nothing can differ (a tolerance would only hide a forgotten state).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from mlsa4rec.cli import main
from mlsa4rec.config import build_config
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.runs import checkpoint
from mlsa4rec.runs.directory import StageLock, staging_dir
from mlsa4rec.training import Trainer
from mlsa4rec.training.run import train

HERE = Path(__file__).resolve().parent
KILL_RUN = HERE.parent / "training" / "kill_run.py"  # shared with the torchrun tests
SMALL = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "hidden_dropout_prob": 0.2,
         "attn_dropout_prob": 0.2, "MAX_ITEM_LIST_LENGTH": 8, "learning_rate": 0.01, "epochs": 3,
         "train_batch_size": 32, "stopping_step": 100, "seed": 11, "checkpoint_steps": 2, "eval_batch_size": 64}


# one torch thread, as each rank and subprocess has (OMP_NUM_THREADS=1): floats are summed in the
# same order in this process as there (and a tiny model pays no thread hand-offs)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stop_at(epoch: int, step: int, exc: BaseException):
    def on_step(e: int, s: int) -> None:
        if (e, s) == (epoch, step):
            raise exc
    return on_step


def progress(path: Path) -> dict:
    return json.loads(checkpoint.load(path)["meta"])["progress"]


def assert_same_run(a: dict, b: dict, dir_a: Path, dir_b: Path) -> None:
    assert a["valid"] == b["valid"] and a["test"] == b["test"]
    assert a["best_epoch"] == b["best_epoch"] and a["epochs_run"] == b["epochs_run"]
    assert [(h["loss"], h.get("valid")) for h in a["history"]] == [(h["loss"], h.get("valid")) for h in b["history"]]
    wa = safetensors.torch.load_file(str(dir_a / "model.safetensors"))
    wb = safetensors.torch.load_file(str(dir_b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_file_format_round_trip_and_damage(tmp_path: Path) -> None:
    path = tmp_path / checkpoint.CHECKPOINT
    state = {"format": checkpoint.FORMAT, "meta": json.dumps({"x": 2 ** 100}), "w": torch.arange(5.0)}
    checkpoint.save(path, state)
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["w"], state["w"]) and json.loads(loaded["meta"])["x"] == 2 ** 100
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(MLSA4RecError, match="corrupt or truncated"):
        checkpoint.load(path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(MLSA4RecError, match="corrupt or truncated"):
        checkpoint.load(path)
    path.write_bytes(b"PK\x03\x04" + data)  # e.g. a plain torch.save file
    with pytest.raises(MLSA4RecError, match="header"):
        checkpoint.load(path)
    assert not list(tmp_path.glob("*.tmp"))


def test_rng_states_round_trip() -> None:
    import random

    import numpy as np

    saved = json.loads(json.dumps(checkpoint.capture_rng(torch.device("cpu"))))  # survives JSON
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)
    checkpoint.restore_rng(saved, torch.device("cpu"))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(successor_file: Path, tmp_path: Path) -> None:
    killed = subprocess.run([sys.executable, str(KILL_RUN), str(successor_file), str(tmp_path / "run"),
                             "2", "3", json.dumps(SMALL)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    stage = staging_dir(tmp_path / "run")
    assert not (tmp_path / "run").exists() and (stage / checkpoint.CHECKPOINT).is_file()
    at = progress(stage / checkpoint.CHECKPOINT)
    assert at["epoch"] == 2 and 0 < at["step"] <= 3  # a mid-epoch checkpoint: steps after it are redone
    resumed = train("sasrec", str(successor_file), tmp_path / "run", overrides=SMALL, resume=True)
    whole = train("sasrec", str(successor_file), tmp_path / "whole", overrides=SMALL)
    assert resumed["resumed"] and not stage.exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != "tensorboard") == [
        "config.yaml", "items.json", "manifest.json", "model.safetensors", "results.json", "train.log"]
    assert_same_run(resumed, whole, tmp_path / "run", tmp_path / "whole")
    assert "resuming the interrupted run" in (tmp_path / "run" / "train.log").read_text()


def test_resume_checks_settings_and_the_staging_rules(successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(MLSA4RecError, match="nothing to resume"):
        train("sasrec", str(successor_file), out, overrides=SMALL, resume=True)
    with pytest.raises(KeyboardInterrupt):
        train("sasrec", str(successor_file), out, overrides=SMALL, on_step=stop_at(1, 5, KeyboardInterrupt()))
    stage = staging_dir(out)
    assert progress(stage / checkpoint.CHECKPOINT)["step"] == 4
    with pytest.raises(MLSA4RecError, match="interrupted run .* is kept in .*--resume.*--overwrite"):
        train("sasrec", str(successor_file), out, overrides=SMALL)
    with pytest.raises(MLSA4RecError, match=r"these differ: learning_rate \(run: 0.01, now: 0.02\)"):
        train("sasrec", str(successor_file), out, overrides={**SMALL, "learning_rate": 0.02}, resume=True)
    lock = StageLock(stage)  # as if another process were training into it
    try:
        with pytest.raises(MLSA4RecError, match="another mlsa4rec process"):
            train("sasrec", str(successor_file), out, overrides=SMALL, resume=True)
    finally:
        lock.release()
    assert progress(stage / checkpoint.CHECKPOINT)["step"] == 4  # every refusal left it alone
    (stage / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a file")  # a write cut short by the crash
    more = train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 4}, resume=True)
    assert more["epochs_run"] == 4 and not stage.exists()
    assert sorted(p.name for p in out.iterdir() if p.name != "tensorboard") == [
        "config.yaml", "items.json", "manifest.json", "model.safetensors", "results.json", "train.log"]
    with pytest.raises(MLSA4RecError, match="has finished"):
        train("sasrec", str(successor_file), out, overrides=SMALL, resume=True)


def test_epochs_may_change_only_with_a_constant_learning_rate() -> None:
    saved = build_config("sasrec", overrides={"lr_scheduler": "cosine", "epochs": 3}).to_dict()
    state = {"meta": json.dumps({"world_size": 1, "data_fingerprint": "f", "config": saved})}
    changed = checkpoint.check_resumable(state, {**saved, "stopping_step": 1}, "f", 1, "config.yaml")
    assert changed == ["stopping_step 10 -> 1"]
    with pytest.raises(MLSA4RecError, match="epochs cannot change .* lr_scheduler=cosine"):
        checkpoint.check_resumable(state, {**saved, "epochs": 5}, "f", 1, "config.yaml")
    with pytest.raises(MLSA4RecError, match="data found differs"):
        checkpoint.check_resumable(state, saved, "g", 1, "config.yaml")
    with pytest.raises(MLSA4RecError, match="trained with 1 process.*cannot resume with 2"):
        checkpoint.check_resumable(state, saved, "f", 2, "config.yaml")


def test_a_setting_added_since_the_checkpoint_counts_at_its_default() -> None:
    """A run checkpointed by an older mlsa4rec (no bucket_batches key) resumes unless the setting is
    now given another value than the default it ran with."""
    now = build_config("sasrec").to_dict()
    older = {k: v for k, v in now.items() if k != "bucket_batches"}
    state = {"meta": json.dumps({"world_size": 1, "data_fingerprint": "f", "config": older})}
    assert checkpoint.check_resumable(state, now, "f", 1, "config.yaml") == []
    with pytest.raises(MLSA4RecError, match=r"bucket_batches \(run: True, now: False\)"):
        checkpoint.check_resumable(state, {**now, "bucket_batches": False}, "f", 1, "config.yaml")


def test_overwrite_discards_an_interrupted_run_and_debris_is_replaced(successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train("sasrec", str(successor_file), out, overrides=SMALL, on_step=stop_at(2, 1, RuntimeError("boom")))
    assert (staging_dir(out) / checkpoint.CHECKPOINT).is_file()
    first = train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 1}, overwrite=True)
    assert first["epochs_run"] == 1 and not staging_dir(out).exists()
    staging_dir(tmp_path / "other").mkdir()  # a run killed before its first checkpoint: its lock and config
    (staging_dir(tmp_path / "other") / ".lock").touch()
    (staging_dir(tmp_path / "other") / "config.yaml").write_text("model: sasrec\n")
    train("sasrec", str(successor_file), tmp_path / "other", overrides={**SMALL, "epochs": 1})
    assert not staging_dir(tmp_path / "other").exists()


def test_non_finite_loss_keeps_the_last_good_checkpoint(successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    models = []
    original = Trainer.__init__

    def capture(self, model, *args, **kwargs) -> None:  # get hold of the model to poison it
        models.append(model)
        original(self, model, *args, **kwargs)

    def poison(epoch: int, step: int) -> None:
        if (epoch, step) == (2, 2):
            with torch.no_grad():
                models[0].item_embedding.weight.fill_(float("nan"))

    monkeypatch.setattr(Trainer, "__init__", capture)
    with pytest.raises(MLSA4RecError, match=r"loss became nan at epoch 2 \(step 3\).*kept in .*--resume"):
        train("sasrec", str(successor_file), tmp_path / "run", overrides={**SMALL, "checkpoint_steps": 1},
              on_step=poison)
    saved = checkpoint.load(staging_dir(tmp_path / "run") / checkpoint.CHECKPOINT)
    assert json.loads(saved["meta"])["progress"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_cli_reports_a_damaged_checkpoint(capsys, successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train("sasrec", str(successor_file), out, overrides=SMALL, on_step=stop_at(2, 2, KeyboardInterrupt()))
    path = staging_dir(out) / checkpoint.CHECKPOINT
    good = path.read_bytes()
    argv = ["train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir", str(out), "--resume"]
    for key, value in SMALL.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0x01
    for damaged in (good[: len(good) // 2], bytes(flipped)):
        path.write_bytes(damaged)
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and "corrupt or truncated" in err and err.count("\n") == 1, err
        assert "Traceback" not in err
    path.write_bytes(good)
    assert main(argv) == 0 and (out / "results.json").is_file()
