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
MLSA4REC_SMALL = {"hidden_size": 16, "d_state": 8, "k_interests": 4, "n_heads": 2, "dropout_prob": 0.0,
                  "attn_dropout_prob": 0.0}
SMALL = {  # causal models: all-positions training
    "mamba4rec": ("mamba4rec", {"hidden_size": 16, "d_state": 8, "dropout_prob": 0.0}),
    "gru4rec": ("gru4rec", {"embedding_size": 16, "hidden_size": 32, "dropout_prob": 0.0}),
    "mlsa4rec-causal": ("mlsa4rec", {**MLSA4REC_SMALL, "variant": "causal"}),
    "sasrec-cosine": ("sasrec", {"hidden_size": 16, "inner_size": 32, "n_heads": 1, "hidden_dropout_prob": 0.0,
                                 "attn_dropout_prob": 0.0, "similarity": "cosine", "temperature": 0.05}),
}
PREFIX = {  # non-causal models: prefix samples
    "mlsa4rec-faithful": ("mlsa4rec", MLSA4REC_SMALL),
    "mlsa4rec-masked": ("mlsa4rec", {**MLSA4REC_SMALL, "variant": "masked"}),
    "lightsans": ("lightsans", {"hidden_size": 16, "inner_size": 32, "k_interests": 3, "hidden_dropout_prob": 0.0,
                                "attn_dropout_prob": 0.0}),
}


@pytest.mark.parametrize("case", sorted(SMALL))
def test_learns_the_successor_pattern(case, successor_file: Path, tmp_path: Path) -> None:
    name, kw = SMALL[case]
    results = train(name, str(successor_file), tmp_path / "run", overrides={**COMMON, **kw})
    assert results["train_scheme"] == "all_positions"
    assert results["test"]["hit@1"] > 0.9, results["test"]


@pytest.mark.parametrize("case", sorted(PREFIX))
def test_non_causal_models_learn_from_prefixes(case, successor_file: Path, tmp_path: Path) -> None:
    name, kw = PREFIX[case]
    results = train(name, str(successor_file), tmp_path / "run", overrides={**COMMON, **kw, "train_batch_size": 128})
    assert results["train_scheme"] == "prefix"
    assert results["test"]["hit@1"] > 0.9, results["test"]


@pytest.mark.parametrize("case", sorted(SMALL))
def test_all_positions_loss_equals_prefix_loss(case, successor_file: Path) -> None:
    """Causal: the loss over all positions of the windows = the mean loss over every prefix."""
    name, kw = SMALL[case]
    data = load_dataset(str(successor_file))  # sequences of 6..14 items < L = 20
    torch.manual_seed(0)
    model = create(name, data.n_items, MAX_ITEM_LIST_LENGTH=20, **kw).eval()
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
