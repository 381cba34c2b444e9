"""The RecBole parity benchmark's small pieces: the sample digests of the export read back, and the
settings it hands RecBole. None of this needs RecBole installed. The export itself
(``mlsa4rec.interop.recbole``) is tested in tests/interop/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from mlsa4rec.data import load_dataset
from mlsa4rec.interop.recbole import export_recbole, same_sequences

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py from beside them
_spec = importlib.util.spec_from_file_location("recbole_parity", REPO / "benchmarks" / "recbole_parity.py")
rp = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("recbole_parity", rp)
_spec.loader.exec_module(rp)

OFF = "[0,inf)"


def _load(path: Path, interval: str):
    return load_dataset(str(path), None, interval, interval, use_cache=False)


@pytest.mark.parametrize("interval", ["[5,inf)", OFF])
def test_export_reads_back_identically(successor_file, tmp_path, interval):
    original = _load(successor_file, "[5,inf)")   # our 5-core data, as the benchmark exports it
    inter = export_recbole(original, tmp_path / "export", "succ")
    assert inter == tmp_path / "export" / "succ" / "succ.inter"  # RecBole's data_path/NAME/NAME.inter
    back = _load(inter, interval)                  # 5-core again is a no-op; no filter at all too
    assert (back.n_users, back.n_items, back.n_interactions) == (
        original.n_users, original.n_items, original.n_interactions)
    assert same_sequences(original, back)
    assert np.array_equal(back.lengths, original.lengths)
    # the samples of every split, token for token: tests/interop/test_recbole.py, on these same inputs
    assert rp.our_data_summary(back, 5) == rp.our_data_summary(original, 5)  # histories truncated to L too


def test_sample_digest_ignores_order_and_sees_histories():
    users, targets = np.array([0, 1]), np.array([3, 4])
    hist = np.array([[1, 2, -1], [2, -1, -1]])
    a = rp.samples_digest(users, targets, hist)
    assert a == rp.samples_digest(users[::-1], targets[::-1], hist[::-1])
    assert a["count"] == 2
    assert a != rp.samples_digest(users, targets, np.array([[2, 1, -1], [2, -1, -1]]))


def test_recbole_settings_mirror_ours(tmp_path):
    config = rp.parity_config("sasrec", [], {"MAX_ITEM_LIST_LENGTH": 20, "hidden_dropout_prob": 0.2})
    assert config["train_scheme"] == "prefix" and config["train_batch_size"] == 2048
    rb = rp.recbole_config(config, "beauty", tmp_path, tmp_path / "w", threads=2)
    assert rb["model"] == "SASRec" and rb["dataset"] == "beauty" and rb["data_path"] == str(tmp_path)
    assert rb["eval_args"] == {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}
    assert rb["train_neg_sample_args"] is None and rb["loss_type"] == "CE"
    assert rb["metrics"] == ["Hit", "NDCG", "MRR"] and rb["topk"] == [5, 10] and rb["valid_metric"] == "NDCG@10"
    assert (rb["MAX_ITEM_LIST_LENGTH"], rb["train_batch_size"], rb["hidden_dropout_prob"]) == (20, 2048, 0.2)
    assert rb["user_inter_num_interval"] == rb["item_inter_num_interval"] == "[5,inf)"
    for key in ("learning_rate", "epochs", "stopping_step", "seed", "n_layers", "n_heads", "hidden_size",
                "inner_size", "attn_dropout_prob"):
        assert rb[key] == config[key]
    with pytest.raises(SystemExit, match="lrurec"):
        rp.parity_config("lrurec", [], {})
    with pytest.raises(SystemExit, match="similarity"):  # HSTU's head, not RecBole's
        rp.parity_config("sasrec", [], {"similarity": "cosine", "temperature": 0.05})


def test_mamba4rec_runs_the_restated_model_with_the_released_settings(tmp_path):
    config = rp.parity_config("mamba4rec", [], {})
    assert (config["train_scheme"], config["train_batch_size"]) == ("prefix", 2048)  # not our all-positions default
    rb = rp.recbole_config(config, "beauty", tmp_path, tmp_path / "w", threads=1)
    assert rb["model"] == "Mamba4Rec" and rb["model"] in rp.OUTSIDE_RECBOLE
    assert (rb["hidden_size"], rb["num_layers"], rb["dropout_prob"], rb["d_state"], rb["d_conv"], rb["expand"],
            rb["initializer_range"]) == (64, 1, 0.2, 32, 4, 2, 0.02)
    assert (REPO / "benchmarks" / f"{rp.OUTSIDE_RECBOLE['Mamba4Rec']}.py").is_file()


def test_a_finished_recbole_run_is_reused_only_for_the_same_spec(tmp_path):
    spec = {"model": "GRU4Rec", "seed": 2021, "epochs": 12}
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "result.json"
    assert not rp.finished_with(spec_path, out_path, spec)
    spec_path.write_text(rp.json.dumps(spec))
    out_path.write_text('{"history": []}')  # interrupted before the test metrics
    assert not rp.finished_with(spec_path, out_path, spec)
    out_path.write_text('{"history": [], "test": {"hit@10": 0.04}}')
    assert rp.finished_with(spec_path, out_path, spec)
    assert not rp.finished_with(spec_path, out_path, {**spec, "seed": 2020})
    out_path.write_text('{"test": ')  # torn write
    assert not rp.finished_with(spec_path, out_path, spec)
    # reuse returns the stored result without starting RecBole (no interpreter is needed)
    out_path.write_text('{"history": [], "test": {"hit@10": 0.04}}')
    assert rp.run_recbole(tmp_path / "no-python", spec, tmp_path)["test"] == {"hit@10": 0.04}


def test_bert4rec_runs_recboles_cloze_and_prediction(tmp_path):
    config = rp.parity_config("bert4rec", [], {"MAX_ITEM_LIST_LENGTH": 20})
    assert config["train_scheme"] == "cloze" and config["recbole_eval_shift"] is True
    rb = rp.recbole_config(config, "beauty", tmp_path, tmp_path / "w", threads=2)
    assert rb["model"] == "BERT4Rec" and "recbole_eval_shift" not in rb   # not a RecBole setting
    assert (rb["mask_ratio"], rb["ft_ratio"], rb["hidden_dropout_prob"]) == (0.2, 0.5, 0.2)
    # the scheme and the prediction are forced: a --set cannot make the comparison unlike RecBole
    undone = rp.parity_config("bert4rec", [], {"train_scheme": "prefix", "recbole_eval_shift": False})
    assert (undone["train_scheme"], undone["recbole_eval_shift"]) == ("cloze", True)
    assert rp.parity_config("sasrec", [], {})["train_scheme"] == "prefix"
