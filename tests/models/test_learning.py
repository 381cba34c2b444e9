"""Every causal model learns a simple pattern end to end, and its two training schemes agree."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mlsa4rec.data import load_dataset
from mlsa4rec.data.sampling import TrainSampler
from mlsa4rec.models import create
from mlsa4rec.training.run import train
from mlsa4rec.training.trainer import cross_entropy

COMMON = {"MAX_ITEM_LIST_LENGTH": 8, "learning_rate": 0.01, "epochs": 30, "train_batch_size": 64,
          "stopping_step": 3, "topk": [1, 5, 10], "seed": 7}
SMALL = {
    "mamba4rec": {"hidden_size": 16, "d_state": 8, "dropout_prob": 0.0},
    "gru4rec": {"embedding_size": 16, "hidden_size": 32, "dropout_prob": 0.0},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_learns_the_successor_pattern(name, successor_file: Path, tmp_path: Path) -> None:
    results = train(name, str(successor_file), tmp_path / "run", overrides={**COMMON, **SMALL[name]})
    assert results["train_scheme"] == "all_positions"
    assert results["test"]["hit@1"] > 0.9, results["test"]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_all_positions_loss_equals_prefix_loss(name, successor_file: Path) -> None:
    """Causal: the loss over all positions of the windows = the mean loss over every prefix."""
    data = load_dataset(str(successor_file))  # sequences of 6..14 items < L = 20
    torch.manual_seed(0)
    model = create(name, data.n_items, MAX_ITEM_LIST_LENGTH=20, **SMALL[name]).eval()
    means = {}
    with torch.no_grad():
        for scheme in ("prefix", "all_positions"):
            total, count = 0.0, 0
            for batch in TrainSampler(data, scheme, 20, 16, seed=0, trim=True):
                n = int((batch.targets > 0).sum()) if scheme == "all_positions" else len(batch.targets)
                total += cross_entropy(model, batch, scheme, torch.device("cpu")).item() * n
                count += n
            means[scheme] = (total / count, count)
    assert means["prefix"][1] == means["all_positions"][1]
    assert math.isclose(means["prefix"][0], means["all_positions"][0], rel_tol=1e-5), means
