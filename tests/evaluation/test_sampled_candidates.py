"""Sampled-candidate metrics (NOT the protocol): the negatives drawn, the ranks among them, their
labels, and `mlsa4rec evaluate --sampled-candidates`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import successor_sequences, write_user_lines
from mlsa4rec.cli import main
from mlsa4rec.data.dataset import build_sequences
from mlsa4rec.data.readers import Interactions
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation.evaluator import (
    evaluate_sampled,
    history_pairs,
    sample_negatives,
    sampled_split_ranks,
)
from mlsa4rec.models.base import SequentialRecommender
from mlsa4rec.settings import TrainConfig


class ById(SequentialRecommender):
    """Scores item i as i: a target's rank among candidates is 1 + the candidates with a larger id."""

    def __init__(self, n_items: int) -> None:
        super().__init__()
        self.n_items = n_items
        self.item_embedding = torch.nn.Embedding(n_items + 1, 1)
        self.item_embedding.weight.data = torch.arange(n_items + 1, dtype=torch.float32)[:, None]

    def encode(self, item_seq, lengths):
        return torch.ones(item_seq.shape[0], item_seq.shape[1], 1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 15, size=60)
    users = np.repeat(np.arange(60), lengths)
    items = rng.choice(np.arange(1, 201), size=users.shape[0], p=np.r_[np.full(20, 0.03), np.full(180, 0.4 / 180)])
    return build_sequences(Interactions(users, items, np.arange(users.shape[0], dtype=float)), "t", "[0,inf)",
                           "[0,inf)")


def test_negatives_are_distinct_and_never_the_target_or_history(data) -> None:
    targets = data.eval_targets("test")
    for exclude in (False, True):
        neg = sample_negatives(data, targets, 25, seed=3, exclude_history=exclude)
        assert neg.shape == (len(targets), 25) and neg.min() >= 1 and neg.max() <= data.n_items
        assert all(len(set(row)) == 25 for row in neg.tolist())
        assert not (neg == data.items[targets][:, None]).any()
        rows, items = history_pairs(data, targets)
        seen = set(zip(rows.tolist(), items.tolist()))
        hits = sum((r, int(i)) in seen for r, row in enumerate(neg) for i in row)
        assert (hits == 0) if exclude else (hits > 0)


def test_negatives_depend_only_on_seed_split_and_user(data) -> None:
    targets = data.eval_targets("test")
    whole = sample_negatives(data, targets, 10, seed=1)
    assert np.array_equal(whole[7:19], sample_negatives(data, targets[7:19], 10, seed=1))  # batch-independent
    assert np.array_equal(whole, sample_negatives(data, targets, 10, seed=1))
    assert not np.array_equal(whole, sample_negatives(data, targets, 10, seed=2))
    assert not np.array_equal(whole, sample_negatives(data, targets, 10, seed=1, split="valid"))


def test_popularity_sampler_follows_training_counts(data) -> None:
    counts = data.training_counts()
    targets = np.repeat(data.eval_targets("test"), 20)[:1000]
    neg = sample_negatives(data, targets, 5, "popularity", seed=0)
    assert counts[neg].min() > 0  # never an item without training events
    popular = np.isin(neg, np.argsort(counts)[-20:]).mean()
    uniform = np.isin(sample_negatives(data, targets, 5, "uniform", seed=0), np.argsort(counts)[-20:]).mean()
    assert popular > 2 * uniform


def test_too_many_negatives_or_a_bad_sampler_are_refused(data) -> None:
    targets = data.eval_targets("test")
    with pytest.raises(MLSA4RecError, match="ask for fewer"):
        sample_negatives(data, targets, data.n_items, seed=0)
    with pytest.raises(MLSA4RecError, match="sampler"):
        sample_negatives(data, targets, 5, "zipf")


def test_sampled_ranks_count_negatives_scored_higher(data) -> None:
    model = ById(data.n_items)
    targets = data.eval_targets("test")
    neg = sample_negatives(data, targets, 30, seed=4)
    want = 1 + (neg > data.items[targets][:, None]).sum(axis=1)
    got = sampled_split_ranks(model, data, "test", 10, 30, seed=4, batch_size=7)
    assert got.tolist() == want.tolist()
    assert got.max() <= 31
    metrics = evaluate_sampled(model, data, "test", TrainConfig(max_seq_length=10), 30, seed=4)
    assert set(metrics) == {f"sampled30_{m}@{k}" for m in ("hit", "ndcg", "mrr") for k in (5, 10)}
    pop = evaluate_sampled(model, data, "test", TrainConfig(max_seq_length=10), 30, "popularity")
    assert all(name.startswith("sampled30pop_") for name in pop)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_cli_labels_sampled_metrics(capsys, tmp_path: Path, one_torch_thread) -> None:
    data_file = write_user_lines(tmp_path / "succ.txt", successor_sequences(120, 30, seed=1))
    out_dir = tmp_path / "run"
    code, _, _ = run(capsys, "train", "-q", "--model", "gru4rec", "--dataset", str(data_file), "--output-dir",
                     str(out_dir), "--set", "epochs=1", "--set", "hidden_size=8")
    assert code == 0
    code, out, _ = run(capsys, "evaluate", "-q", "--run-dir", str(out_dir), "--sampled-candidates", "10", "--json")
    result = json.loads(out)
    assert code == 0 and result["sampled_candidates"] == 10 and result["candidate_sampler"] == "uniform"
    assert "Krichene & Rendle" in result["warning"] and "not the full-ranking protocol" in result["protocol"]
    assert set(result["test"]) == {f"sampled10_{m}@{k}" for m in ("hit", "ndcg", "mrr") for k in (5, 10)}
    code, out, _ = run(capsys, "evaluate", "-q", "--run-dir", str(out_dir), "--sampled-candidates", "10",
                       "--candidate-sampler", "popularity", "--candidate-seed", "3", "--history", "excluded")
    first, header = out.splitlines()[:2]
    assert code == 0 and first.startswith("WARNING: sampled10pop_* metrics") and "NOT among all items" in first
    assert "sampled10pop_hit@10" in header
    code, _, err = run(capsys, "evaluate", "-q", "--run-dir", str(out_dir), "--candidate-seed", "3")
    assert code == 2 and "only go with --sampled-candidates" in err
    code, _, err = run(capsys, "evaluate", "-q", "--run-dir", str(out_dir), "--sampled-candidates", "0")
    assert code == 2 and "--sampled-candidates must be a positive" in err
