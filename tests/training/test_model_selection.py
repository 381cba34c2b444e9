"""Model selection in the trainer: the validation split alone drives early stopping, and the weights
kept in memory, saved to model.safetensors and scored on the test split are the best epoch's.

The evaluation is stubbed by a table of scores per split and per epoch, looked up by the weights it
is given: the weights after each epoch are recorded, and the stub finds which epoch's weights the
model holds when it is evaluated (none: it fails). So a score reported for the test split tells
which weights produced it. The validation curve peaks in the middle of the run, the test curve
elsewhere, and the last epoch is neither, so selecting on the test split, keeping the last weights,
saving the wrong ones or stopping at the wrong time each give other numbers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import mlsa4rec.training.trainer as trainer_module
from mlsa4rec.training import Trainer
from mlsa4rec.training.run import train

SMALL = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "hidden_dropout_prob": 0.2,
         "attn_dropout_prob": 0.2, "MAX_ITEM_LIST_LENGTH": 8, "learning_rate": 0.01, "train_batch_size": 64,
         "valid_metric": "ndcg@10", "seed": 11}

# scenario -> settings, the validation and test NDCG@10 after each epoch, and what must come out:
# the best epoch (the validation peak; the test curve peaks elsewhere) and the epochs run
SCENARIOS = {
    "every-epoch": (
        {"epochs": 8, "eval_step": 1, "stopping_step": 2},
        {1: 0.10, 2: 0.20, 3: 0.40, 4: 0.30, 5: 0.35, 6: 0.25, 7: 0.50, 8: 0.60},
        {1: 0.10, 2: 0.20, 3: 0.25, 4: 0.45, 5: 0.60, 6: 0.30, 7: 0.20, 8: 0.10},
        3, 6,  # epochs 4, 5, 6 miss the peak of epoch 3: 3 misses > stopping_step 2, stop after 6
    ),
    "every-second-epoch": (
        {"epochs": 10, "eval_step": 2, "stopping_step": 1},
        {2: 0.20, 4: 0.50, 6: 0.30, 8: 0.40, 10: 0.90},
        {2: 0.10, 4: 0.30, 6: 0.70, 8: 0.20, 10: 0.95},
        4, 8,  # validated at 2, 4, 6, 8: two misses after epoch 4 (> 1), stop after 8
    ),
}


def scores(valid: dict[int, float], test: dict[int, float], split: str, epoch: int) -> dict[str, float]:
    value = {"valid": valid, "test": test}[split][epoch]
    return {"hit@10": min(1.0, 2 * value), "ndcg@10": value}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_best_validation_epoch_is_kept_saved_and_tested(successor_file: Path, tmp_path: Path, monkeypatch,
                                                            scenario: str) -> None:
    settings, valid, test, best, stopped = SCENARIOS[scenario]
    snapshots: dict[int, dict[str, torch.Tensor]] = {}   # the weights after each epoch
    calls: list[tuple[str, int]] = []                     # (split, epoch whose weights were evaluated)
    final: dict[str, dict[str, torch.Tensor]] = {}

    train_epoch, fit = Trainer.train_epoch, Trainer.fit

    def recording_train_epoch(self, epoch: int) -> float:
        loss = train_epoch(self, epoch)
        snapshots[epoch] = copy.deepcopy(self.model.state_dict())
        return loss

    def recording_fit(self):
        result = fit(self)
        final["weights"] = copy.deepcopy(self.model.state_dict())
        return result

    def stub_evaluate(model, data, split, config, device, group=None) -> dict[str, float]:
        epochs = [e for e, w in snapshots.items() if same_weights(model.state_dict(), w)]
        assert len(epochs) == 1, f"evaluated weights of no single epoch ({epochs})"
        calls.append((split, epochs[0]))
        return scores(valid, test, split, epochs[0])

    monkeypatch.setattr(Trainer, "train_epoch", recording_train_epoch)
    monkeypatch.setattr(Trainer, "fit", recording_fit)
    monkeypatch.setattr(trainer_module, "evaluate_split", stub_evaluate)
    out = tmp_path / "run"
    results = train("sasrec", str(successor_file), out, overrides={**SMALL, **settings})

    validated = [e for e in range(1, stopped + 1) if e % settings["eval_step"] == 0]
    # early stopping read the validation split, once per validated epoch, and nothing else
    assert calls[:-2] == [("valid", e) for e in validated]
    # then the final scores: both splits, on the best epoch's weights
    assert sorted(calls[-2:]) == [("test", best), ("valid", best)]
    assert (results["best_epoch"], results["epochs_run"], results["stopped_early"]) == (best, stopped, True)
    assert results["valid"] == scores(valid, test, "valid", best)
    assert results["test"] == scores(valid, test, "test", best)
    assert [row.get("valid") for row in results["history"]] == [
        scores(valid, test, "valid", e) if e in validated else None for e in range(1, stopped + 1)]
    assert sorted(snapshots) == list(range(1, stopped + 1))
    # the epochs' weights differ (so the lookup above is meaningful), and memory holds the best
    assert not any(same_weights(snapshots[a], snapshots[b]) for a in snapshots for b in snapshots if a < b)
    assert same_weights(final["weights"], snapshots[best])
    # the saved weights are the best epoch's, and say so
    saved = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert same_weights(saved, snapshots[best])
    with safetensors.safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["epoch"] == str(best)
    on_disk = json.loads((out / "results.json").read_text())
    assert (on_disk["best_epoch"], on_disk["test"]) == (best, scores(valid, test, "test", best))
