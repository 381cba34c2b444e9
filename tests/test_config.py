"""Config precedence and validation: every bad key or value fails with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlsa4rec.config import build_config, parse_interval, parse_set
from mlsa4rec.errors import ConfigError


def test_precedence_defaults_model_file_set(tmp_path: Path) -> None:
    default = build_config("sasrec")
    assert default["learning_rate"] == 0.001 and default["hidden_size"] == 64
    assert default["hidden_dropout_prob"] == 0.5  # the model's YAML
    f1 = tmp_path / "a.yaml"
    f1.write_text("learning_rate: 0.01\nhidden_size: 32\n")
    f2 = tmp_path / "b.yaml"
    f2.write_text("learning_rate: 0.02\n")
    c = build_config("sasrec", [f1, f2], parse_set(["hidden_size=16", "topk=[10, 5, 10]"]))
    assert c["learning_rate"] == 0.02 and c["hidden_size"] == 16 and c["topk"] == [5, 10]
    assert c.model_kwargs()["hidden_size"] == 16 and "learning_rate" not in c.model_kwargs()


def test_unknown_key_is_named_with_suggestion() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'.*did you mean 'learning_rate'"):
        build_config("sasrec", overrides={"learning_rat": 1})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"epochs": "many"}, "epochs: expected int"),
        ({"epochs": 1.5}, "epochs: expected int"),
        ({"learning_rate": -1.0}, "learning_rate must be > 0"),
        ({"hidden_dropout_prob": 1.0}, r"hidden_dropout_prob must be in \[0, 1\)"),
        ({"valid_metric": "auc@10"}, "valid_metric 'auc@10' is not computed"),
        ({"valid_metric": "ndcg@20"}, "valid_metric 'ndcg@20' is not computed"),
        ({"metrics": ["hit", "map"]}, "unknown metric 'map'"),
        ({"topk": [0]}, "topk must be a list of positive integers"),
        ({"train_scheme": "windows"}, "train_scheme must be one of"),
        ({"user_inter_num_interval": "5+"}, "is not an interval"),
        ({"loss_type": "BPR"}, "only CE"),
        ({"device": "gpu"}, "device must be"),
        ({"use_gpu": True}, "unknown config key 'use_gpu'"),
        ({"epochs": None}, "epochs: a value is required"),
        ({"metrics": None}, "metrics: a value is required"),
    ],
)
def test_bad_values(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config("sasrec", overrides=override)


def test_recbole_style_names_are_accepted() -> None:
    c = build_config("sasrec", overrides={"valid_metric": "NDCG@10", "metrics": ["Hit", "NDCG", "MRR"],
                                          "learning_rate": 1})
    assert c["valid_metric"] == "ndcg@10" and c["metrics"] == ["hit", "ndcg", "mrr"]
    assert c["learning_rate"] == 1.0 and isinstance(c["learning_rate"], float)


def test_bad_files_and_set_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("sasrec", [tmp_path / "none.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config("sasrec", [bad])
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config("sasrec", [bad])
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["epochs"])


def test_intervals() -> None:
    assert parse_interval("[5,inf)") == (5, float("inf"))
    assert parse_interval("(2,10)") == (3, 9)
    assert parse_interval("[0,3]") == (0, 3)
    assert parse_interval("(-inf,5]") == (float("-inf"), 5)
    with pytest.raises(ConfigError, match="empty"):
        parse_interval("[5,2]")
