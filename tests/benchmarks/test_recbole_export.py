"""The RecBole parity benchmark's small pieces: the atomic-file export and the settings it hands
RecBole. None of this needs RecBole installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from mlsa4rec.data import load_dataset

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("recbole_parity", REPO / "benchmarks" / "recbole_parity.py")
rp = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("recbole_parity", rp)
_spec.loader.exec_module(rp)

OFF = "[0,inf)"


def _load(path: Path, interval: str):
    return load_dataset(str(path), None, interval, interval, use_cache=False)


def _split_tokens(data) -> dict[str, list[tuple[str, str]]]:
    """(user token, target item token) of every sample of every split."""
    out = {}
    for split in ("train", "valid", "test"):
        targets = data.train_targets() if split == "train" else data.eval_targets(split)
        users = np.searchsorted(data.offsets, targets, side="right") - 1
        out[split] = [(str(data.user_tokens[u]), str(data.item_tokens[data.items[t]])) for u, t in zip(users, targets)]
    return out


def _timestamps(inter: Path) -> dict[str, list[float]]:
    per_user: dict[str, list[float]] = {}
    for line in inter.read_text().splitlines()[1:]:
        user, _, ts = line.split("\t")
        per_user.setdefault(user, []).append(float(ts))
    return per_user


@pytest.mark.parametrize("interval", ["[5,inf)", OFF])
def test_export_reads_back_identically(successor_file, tmp_path, interval):
    original = _load(successor_file, "[5,inf)")   # our 5-core data, as the benchmark exports it
    inter = rp.export_recbole(original, tmp_path / "export", "succ")
    assert inter == tmp_path / "export" / "succ" / "succ.inter"  # RecBole's data_path/NAME/NAME.inter
    back = _load(inter, interval)                  # 5-core again is a no-op; no filter at all too
    assert (back.n_users, back.n_items, back.n_interactions) == (
        original.n_users, original.n_items, original.n_interactions)
    assert rp.same_sequences(original, back)
    assert np.array_equal(back.lengths, original.lengths)
    assert _split_tokens(back) == _split_tokens(original)
    assert rp.our_data_summary(back, 5) == rp.our_data_summary(original, 5)  # histories truncated to L too


def test_export_timestamps_are_positions_without_ties(successor_file, tmp_path):
    data = _load(successor_file, "[5,inf)")
    inter = rp.export_recbole(data, tmp_path)
    header = inter.read_text().splitlines()[0]
    assert header == "user_id:token\titem_id:token\ttimestamp:float"
    per_user = _timestamps(inter)
    assert len(per_user) == data.n_users
    for ts, n in zip(per_user.values(), data.lengths):
        assert ts == [float(p) for p in range(1, n + 1)]


def test_hand_worked_three_users(tmp_path):
    # u2 ties b/a at t=20 (file order keeps b first); u1 ties a/b at t=10 and is out of order in
    # the file; u3 is in order. Items and users keep their raw string tokens.
    csv = tmp_path / "three.csv"
    csv.write_text("user,item,timestamp\n"
                   "u2,b,20\nu1,a,10\nu1,c,5\nu2,a,20\nu3,c,1\nu1,b,10\nu3,b,2\nu3,a,3\nu2,c,30\nu1,d,7\n")
    data = _load(csv, OFF)
    inter = rp.export_recbole(data, tmp_path / "out", "three")
    assert inter.read_text() == (
        "user_id:token\titem_id:token\ttimestamp:float\n"
        "u2\tb\t1\nu2\ta\t2\nu2\tc\t3\n"
        "u1\tc\t1\nu1\td\t2\nu1\ta\t3\nu1\tb\t4\n"
        "u3\tc\t1\nu3\tb\t2\nu3\ta\t3\n"
    )
    back = _load(inter, OFF)
    assert rp.token_sequences(back) == [["b", "a", "c"], ["c", "d", "a", "b"], ["c", "b", "a"]]
    # leave-one-out: 3 events -> train + test, 4 events -> train + valid + test
    assert _split_tokens(back) == {
        "train": [("u2", "a"), ("u1", "d"), ("u3", "b")],
        "valid": [("u1", "a")],
        "test": [("u2", "c"), ("u1", "b"), ("u3", "a")],
    }
    assert _split_tokens(back) == _split_tokens(data)


def test_export_refuses_tokens_that_break_the_format(tmp_path):
    csv = tmp_path / "tab.csv"
    csv.write_text('user,item,timestamp\nu1,"a\tb",1\nu1,c,2\n')
    with pytest.raises(ValueError, match="token"):
        rp.export_recbole(_load(csv, OFF), tmp_path / "out")


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
