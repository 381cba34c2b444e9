"""End-to-end training on synthetic data: learning, early stopping, the run directory, re-evaluation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

from mlsa4rec.config import build_config
from mlsa4rec.data import load_dataset
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation.runs import evaluate_run
from mlsa4rec.models import create
from mlsa4rec.training import Trainer
from mlsa4rec.training.run import train

SMALL = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "hidden_dropout_prob": 0.0,
         "attn_dropout_prob": 0.0, "MAX_ITEM_LIST_LENGTH": 8, "learning_rate": 0.01, "epochs": 30,
         "train_batch_size": 64, "stopping_step": 3, "topk": [1, 5, 10], "seed": 7}


@pytest.mark.parametrize("scheme", ["prefix", "all_positions"])
def test_sasrec_learns_the_successor_pattern(successor_file: Path, tmp_path: Path, scheme: str) -> None:
    results = train("sasrec", str(successor_file), tmp_path / "run", overrides={**SMALL, "train_scheme": scheme})
    assert results["train_scheme"] == scheme
    assert results["test"]["hit@1"] > 0.9, results["test"]
    assert results["test"]["ndcg@10"] > 0.9
    assert 1 <= results["best_epoch"] <= results["epochs_run"] <= 30


def test_run_directory_contents_and_reevaluation(successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 4, "stopping_step": 100})
    tensorboard = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []  # --tracking auto
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "items.json", "manifest.json",
                                                     "model.safetensors", "results.json", *tensorboard, "train.log"]
    assert not list(tmp_path.glob(".run.partial*"))
    saved = json.loads((out / "results.json").read_text())
    for key in ("valid", "test", "best_epoch", "epochs_run", "seconds_per_epoch", "parameters", "versions",
                "git_commit", "dataset", "history"):
        assert key in saved
    assert saved["epochs_run"] == 4 and len(saved["history"]) == 4
    assert saved["versions"]["torch"] == torch.__version__
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == "sasrec" and config["hidden_size"] == 16
    state = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert "item_embedding.weight" in state
    again = evaluate_run(out)
    for split in ("valid", "test"):
        for k, v in results[split].items():
            assert again[split][k] == pytest.approx(v, abs=1e-9), (split, k)


def test_existing_output_dir_is_refused(successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MLSA4RecError, match="already exists"):
        train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 1})
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_leaves_no_partial_directory(successor_file: Path, tmp_path: Path, monkeypatch) -> None:
    def boom(self):
        raise RuntimeError("crash in the middle")

    monkeypatch.setattr(Trainer, "fit", boom)
    with pytest.raises(RuntimeError):
        train("sasrec", str(successor_file), tmp_path / "run", overrides={**SMALL, "epochs": 1})
    assert list(tmp_path.iterdir()) == [successor_file]


def test_seed_makes_runs_identical(successor_file: Path, tmp_path: Path) -> None:
    a = train("sasrec", str(successor_file), tmp_path / "a", overrides={**SMALL, "epochs": 2, "stopping_step": 100})
    b = train("sasrec", str(successor_file), tmp_path / "b", overrides={**SMALL, "epochs": 2, "stopping_step": 100})
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["test"] == b["test"]


def test_non_causal_model_refuses_all_positions(successor_file: Path) -> None:
    data = load_dataset(str(successor_file))
    m = create("sasrec", data.n_items, MAX_ITEM_LIST_LENGTH=8)
    m.causal = False  # pretend: a model whose outputs see the future
    config = build_config("sasrec", overrides={"train_scheme": "all_positions"})
    with pytest.raises(MLSA4RecError, match="not causal"):
        Trainer(m, data, config, torch.device("cpu"))


def test_corrupt_weights_give_a_clear_error(successor_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train("sasrec", str(successor_file), out, overrides={**SMALL, "epochs": 1})
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MLSA4RecError, match="corrupt"):
        evaluate_run(out)


def test_overwrite_replaces_only_run_directories(successor_file: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(MLSA4RecError, match="only replaces a run directory"):
        train("sasrec", str(successor_file), precious, overrides={**SMALL, "epochs": 1}, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    run = tmp_path / "run"
    first = train("sasrec", str(successor_file), run, overrides={**SMALL, "epochs": 1})
    second = train("sasrec", str(successor_file), run, overrides={**SMALL, "epochs": 2, "stopping_step": 100},
                   overwrite=True)
    assert first["epochs_run"] == 1 and json.loads((run / "results.json").read_text())["epochs_run"] == 2
    assert second["data_source"].endswith("(user-lines)")


def test_early_stopping_follows_recbole(successor_file: Path, monkeypatch) -> None:
    """A tie counts as an improvement; training stops once misses exceed stopping_step."""
    data = load_dataset(str(successor_file))
    scores = iter([0.1, 0.2, 0.2, 0.1, 0.1, 0.3])
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, epoch: 1.0)
    monkeypatch.setattr(Trainer, "evaluate", lambda self, split: {"ndcg@10": next(scores)})
    config = build_config("sasrec", overrides={"epochs": 6, "stopping_step": 1, "MAX_ITEM_LIST_LENGTH": 8})
    model = create("sasrec", data.n_items, MAX_ITEM_LIST_LENGTH=8)
    fit = Trainer(model, data, config, torch.device("cpu")).fit()
    assert (fit.best_epoch, fit.epochs_run, fit.stopped_early) == (3, 5, True)


def test_no_training_samples_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("".join(f"{u} {u}\n" for u in range(1, 20)))  # one event per user: no samples
    with pytest.raises(MLSA4RecError, match="no training samples"):
        train("sasrec", str(path), tmp_path / "run",
              overrides={"user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)"})
    assert not (tmp_path / "run").exists()


def test_comparison_table_shows_an_undefined_row() -> None:
    """A metric the baseline never scores (0 on every user) is one 'undefined' row, not a refused table."""
    from mlsa4rec.evaluation.runs import format_comparison
    from mlsa4rec.evaluation.significance import compare_ranks, holm

    base, run = np.full(40, 50), np.where(np.arange(40) % 4 == 0, 1, 50)
    rows = holm([compare_ranks(base, run, m) for m in ("hit@10", "hit@100")])
    described = {"run": "b", "model": "sasrec", "variant": None}
    table = format_comparison({"dataset": "d", "split": "test", "users": 40,
                               "baseline": {"run": "a", "model": "gru4rec", "variant": None},
                               "comparisons": [{**described, **r.to_dict()} for r in rows]})
    hit10, hit100 = (line.split() for line in table.splitlines()[3:5])
    assert hit10[:5] == ["hit@10", "0.0000", "0.2500", "undefined", "undefined"]
    assert hit100[0] == "hit@100" and hit100[3].endswith("%") and hit100[4].startswith("[")
