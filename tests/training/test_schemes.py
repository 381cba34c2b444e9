"""For a causal model the two training schemes give the same supervision.

When every user's training part fits in one window, the all-positions loss of an epoch equals the
mean of the prefix losses over the same targets (model in eval mode, so no dropout noise).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mlsa4rec.config import build_config
from mlsa4rec.data import load_dataset
from mlsa4rec.data.sampling import TrainSampler
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.models import create
from mlsa4rec.training.trainer import Trainer, cross_entropy


def epoch_loss(model, data, scheme: str) -> tuple[float, int]:
    total, count = 0.0, 0
    for batch in TrainSampler(data, scheme, 20, 16, seed=0, trim=True):
        n = int((batch.targets > 0).sum()) if scheme == "all_positions" else len(batch.targets)
        total += cross_entropy(model, batch, scheme, torch.device("cpu")).item() * n
        count += n
    return total / count, count


def test_all_positions_equals_prefix_for_a_causal_model(successor_file: Path) -> None:
    data = load_dataset(str(successor_file))  # sequences of 6..14 items < L = 20
    torch.manual_seed(0)
    model = create("sasrec", data.n_items, MAX_ITEM_LIST_LENGTH=20, hidden_size=16, n_heads=2).eval()
    with torch.no_grad():
        prefix, n_prefix = epoch_loss(model, data, "prefix")
        windows, n_windows = epoch_loss(model, data, "all_positions")
    assert n_prefix == n_windows
    assert math.isclose(prefix, windows, rel_tol=1e-5), (prefix, windows)


def test_non_finite_loss_stops_with_a_message(successor_file: Path) -> None:
    data = load_dataset(str(successor_file))
    model = create("sasrec", data.n_items, MAX_ITEM_LIST_LENGTH=8, hidden_size=16, n_heads=1)
    with torch.no_grad():
        model.item_embedding.weight.fill_(float("nan"))
    config = build_config("sasrec", overrides={"epochs": 1, "train_batch_size": 64,
                                                     "MAX_ITEM_LIST_LENGTH": 8})
    with pytest.raises(MLSA4RecError, match="loss became nan"):
        Trainer(model, data, config, torch.device("cpu")).fit()


def test_lr_schedules() -> None:
    from mlsa4rec.training.trainer import lr_factor

    assert lr_factor("constant", 10)(7) == 1.0
    cosine = lr_factor("cosine", 10)
    assert cosine(0) == 1.0 and abs(cosine(5) - 0.5) < 1e-12 and abs(cosine(10)) < 1e-12 and cosine(12) == cosine(10)
    linear = lr_factor("linear", 4)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_a_cloze_batch_without_a_target_is_skipped(successor_file: Path) -> None:
    """One-item histories never take a cloze loss (position 0 is never a target): a batch of only
    those is no optimiser step at all (Adam would still move the weights by its momentum), and the
    epoch's mean loss leaves it out."""
    data = load_dataset(str(successor_file), None, "[0,inf)", "[0,inf)", use_cache=False)
    config = build_config("bert4rec", overrides={"MAX_ITEM_LIST_LENGTH": 10, "train_batch_size": 32,
                                                 "device": "cpu"})
    torch.manual_seed(0)
    trainer = Trainer(create("bert4rec", data.n_items, MAX_ITEM_LIST_LENGTH=10), data, config,
                      torch.device("cpu"))
    trainer.sampler.epoch_batches()
    sampler = trainer.sampler
    singles = (sampler.sample_lengths == 1).nonzero()[0][:32]
    longer = (sampler.sample_lengths >= 5).nonzero()[0][:32]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for coin in (True, False):  # a fine-tuning batch and a masking batch
        sampler.fine_tune[singles] = coin
        assert sampler.targets_in(singles) == 0
        assert trainer.train_step(singles, epoch=1) is None
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    assert not trainer.optimizer.state  # Adam never stepped
    sampler.fine_tune[longer] = True
    assert math.isfinite(trainer.train_step(longer, epoch=1))
    assert trainer.optimizer.state

    # the epoch mean counts only the steps taken
    losses = iter([None, 2.0, 4.0])
    trainer.train_step = lambda rows, epoch: next(losses)
    trainer.sampler.epoch_batches = lambda: [singles, longer, longer]
    assert trainer.train_epoch(1) == 3.0
    assert trainer.progress.empty_steps == 1
