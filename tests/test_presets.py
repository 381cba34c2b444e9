"""Packaged presets: ``--config NAME`` loads a paper's released settings."""

from __future__ import annotations

import pytest

from mlsa4rec.config import build_config, presets
from mlsa4rec.errors import ConfigError


def test_mamba4rec_presets_hold_the_released_settings() -> None:
    assert {"mamba4rec-ml-1m", "mamba4rec-amazon-beauty", "mamba4rec-amazon-video-games"} <= set(presets())
    ml = build_config("mamba4rec", ["mamba4rec-ml-1m"])
    beauty = build_config("mamba4rec", ["mamba4rec-amazon-beauty"])
    assert ml["MAX_ITEM_LIST_LENGTH"] == 200 and beauty["MAX_ITEM_LIST_LENGTH"] == 50
    for c in (ml, beauty):
        assert (c["train_batch_size"], c["learning_rate"], c["epochs"], c["stopping_step"]) == (2048, 1e-3, 300, 10)
        assert c.model_kwargs() == {"hidden_size": 64, "num_layers": 1, "dropout_prob": 0.2, "d_state": 32,
                                    "d_conv": 4, "expand": 2, "initializer_range": 0.02}


def test_a_file_wins_over_a_preset_and_unknown_names_list_the_presets(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mamba4rec-ml-1m").write_text("MAX_ITEM_LIST_LENGTH: 7\n")
    assert build_config("mamba4rec", ["mamba4rec-ml-1m"])["MAX_ITEM_LIST_LENGTH"] == 7
    with pytest.raises(ConfigError, match="packaged preset.*mamba4rec-amazon-beauty"):
        build_config("mamba4rec", ["mamba4rec-ml1m"])
