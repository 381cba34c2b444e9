"""The registry's promise: a model is one class and one registration; its settings come from its config."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from mlsa4rec.cli import main
from mlsa4rec.config import build_config, known_keys
from mlsa4rec.errors import ConfigError
from mlsa4rec.evaluation.runs import evaluate_run
from mlsa4rec.models import available, create, register
from mlsa4rec.models.base import SequentialRecommender
from mlsa4rec.models.registry import _REGISTRY
from mlsa4rec.settings import ModelConfig, TrainConfig, defaults_of, help_of, setting
from mlsa4rec.training.run import train


class LastItem(SequentialRecommender):
    """The smallest model the trainer accepts: a user is the embedding of their last item."""

    causal = True
    padding_invariant = True
    preferred_scheme = "all_positions"

    def __init__(self, n_items: int, max_seq_length: int, config: ModelConfig) -> None:
        super().__init__()
        self.n_items = n_items
        self.max_seq_length = max_seq_length
        self.item_embedding = nn.Embedding(n_items + 1, 8, padding_idx=0)
        self.successor = nn.Linear(8, 8)

    def encode(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.successor(self.item_embedding(item_seq))


@pytest.fixture
def toy() -> Iterator[str]:
    register("toy-last-item")(LastItem)
    yield "toy-last-item"
    del _REGISTRY["toy-last-item"]


def test_a_registered_class_is_all_a_new_model_needs(toy: str, successor_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert toy in available()
    config = build_config(toy)
    assert dict(config) == {"model": toy, **defaults_of(TrainConfig)} and config.model_kwargs() == {}
    with pytest.raises(ConfigError, match="unknown config key 'hidden_size' for model 'toy-last-item'"):
        build_config(toy, overrides={"hidden_size": 8})
    results = train(toy, str(successor_file), tmp_path / "run",
                    overrides={"MAX_ITEM_LIST_LENGTH": 8, "learning_rate": 0.1, "epochs": 30, "seed": 3,
                               "topk": [1, 10]})
    assert results["train_scheme"] == "all_positions"
    assert results["test"]["hit@1"] > 0.9, results["test"]  # each item's successor is learnable from the last item
    assert evaluate_run(tmp_path / "run")["test"]["hit@1"] == results["test"]["hit@1"]
    assert main(["models", "--config", toy]) == 0
    assert "MAX_ITEM_LIST_LENGTH: 50" in capsys.readouterr().out


@dataclass(frozen=True)
class WidthConfig(ModelConfig):
    width: int = setting(4, "embedding width")
    dropout_prob: float = setting(0.0, "dropout")
    train_defaults = {"train_batch_size": 16}

    def check(self) -> None:
        self.at_least(1, "width")


class Widths(LastItem):
    config_class = WidthConfig


def test_a_config_class_declares_keys_defaults_help_and_checks() -> None:
    register("toy-widths")(Widths)
    try:
        assert known_keys("toy-widths")["width"] == 4 and known_keys("toy-widths")["train_batch_size"] == 16
        assert help_of(WidthConfig) == {"width": "embedding width", "dropout_prob": "dropout"}
        assert build_config("toy-widths", overrides={"width": "6"}).model_kwargs() == {"width": 6, "dropout_prob": 0.0}
        with pytest.raises(ConfigError, match="cannot build model 'toy-widths': width must be >= 1, got 0"):
            build_config("toy-widths", overrides={"width": 0})
        with pytest.raises(ConfigError, match=r"dropout_prob must be in \[0, 1\), got 1.0"):
            build_config("toy-widths", overrides={"dropout_prob": 1.0})
        with pytest.raises(ConfigError, match="width: expected int"):
            build_config("toy-widths", overrides={"width": "wide"})
    finally:
        del _REGISTRY["toy-widths"]


def test_every_packaged_model_builds_from_its_config_defaults() -> None:
    for name in available():
        model = create(name, 30)
        assert type(model.config) is type(model).config_class
        assert vars(model.config) == build_config(name).model_kwargs()


def test_create_refuses_a_model_line_that_names_another_model() -> None:
    with pytest.raises(ConfigError, match="--set model=gru4rec but the command trains 'sasrec'"):
        create("sasrec", 5, model="gru4rec")
