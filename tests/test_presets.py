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


def test_mlsa4rec_defaults_are_the_released_config_and_every_preset_builds() -> None:
    from mlsa4rec.models import build_model, get_class

    c = build_config("mlsa4rec")
    assert (c["MAX_ITEM_LIST_LENGTH"], c["train_batch_size"], c["learning_rate"], c["epochs"], c["stopping_step"],
            c["seed"]) == (50, 8192, 1e-3, 100, 10, 2024)
    assert {k: c[k] for k in ("hidden_size", "num_layers", "dropout_prob", "attn_dropout_prob", "k_interests",
                              "n_heads", "d_state", "d_conv", "expand", "variant")} == {
        "hidden_size": 64, "num_layers": 2, "dropout_prob": 0.1, "attn_dropout_prob": 0.1, "k_interests": 20,
        "n_heads": 8, "d_state": 32, "d_conv": 4, "expand": 2, "variant": "faithful"}
    names = [p for p in presets() if p.startswith("mlsa4rec-")]
    assert {"mlsa4rec-masked", "mlsa4rec-causal", "mlsa4rec-ablation-no-lsa", "mlsa4rec-ablation-no-gate",
            "mlsa4rec-ablation-lsa-on-embeddings", "mlsa4rec-ablation-no-norm-layers",
            "mlsa4rec-ablation-no-interaction-mamba"} <= set(names)
    for name in names:
        config = build_config("mlsa4rec", [name])
        model = build_model(get_class("mlsa4rec"), 20, config.model_kwargs(), 50)
        assert model.num_parameters() > 0
    stacked = build_config("mlsa4rec", ["mlsa4rec-causal", "mlsa4rec-ablation-no-gate"])
    assert (stacked["variant"], stacked["gate_act"]) == ("causal", "none")


def test_bert4rec_presets_hold_the_released_settings() -> None:
    from mlsa4rec.models import build_model, get_class

    beauty = build_config("bert4rec", ["bert4rec-amazon-beauty"])
    ml = build_config("bert4rec", ["bert4rec-ml-1m"])
    assert (beauty["MAX_ITEM_LIST_LENGTH"], beauty["mask_ratio"], beauty["hidden_dropout_prob"]) == (50, 0.6, 0.5)
    assert (ml["MAX_ITEM_LIST_LENGTH"], ml["mask_ratio"], ml["hidden_dropout_prob"]) == (200, 0.2, 0.2)
    for c, cap in ((beauty, 30), (ml, 40)):  # max_predictions_per_seq of the released scripts
        assert c["train_scheme"] == "cloze" and c["attn_dropout_prob"] == 0.2
        model = build_model(get_class("bert4rec"), 20, c.model_kwargs(), c["MAX_ITEM_LIST_LENGTH"])
        assert int(model.mask_ratio * model.max_seq_length) == cap


def test_sasrec_presets_hold_the_measured_recipes() -> None:
    beauty = build_config("sasrec", ["sasrec-amazon-beauty"])
    assert (beauty["train_scheme"], beauty["train_batch_size"], beauty["learning_rate"], beauty["stopping_step"],
            beauty["hidden_dropout_prob"], beauty["MAX_ITEM_LIST_LENGTH"]) == ("prefix", 2048, 1e-3, 10, 0.5, 50)
    ml = build_config("sasrec", ["sasrec-ml-1m"])
    assert (ml["train_scheme"], ml["train_batch_size"], ml["learning_rate"], ml["lr_scheduler"], ml["epochs"],
            ml["hidden_dropout_prob"], ml["MAX_ITEM_LIST_LENGTH"]) == ("all_positions", 32, 2e-3, "cosine", 60, 0.2,
                                                                       200)
