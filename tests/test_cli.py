"""The command line: useful output, and one clear line plus exit 2 for every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import successor_sequences, write_user_lines
from mlsa4rec.cli import DATASET_HELP, build_parser, main
from mlsa4rec.data.dataset import cache_dir


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_sasrec(capsys) -> None:
    code, out, _ = run(capsys, "models")
    sasrec = [line for line in out.splitlines() if line.startswith("sasrec")]
    assert code == 0 and len(sasrec) == 1 and "causal" in sasrec[0]
    code, out, _ = run(capsys, "models", "--config", "sasrec")
    assert code == 0 and "MAX_ITEM_LIST_LENGTH: 50" in out and "hidden_size: 64" in out


def test_models_params_counts_every_configuration(capsys) -> None:
    code, out, _ = run(capsys, "models", "--params", "--n-items", "99")
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()[1:]}
    assert code == 0
    faithful = rows["mlsa4rec"].split()
    assert faithful[1] == "148,864" and faithful[2] == f"{148_864 + 100 * 64:,}"
    assert "non-causal" in rows["mlsa4rec"] and "causal, padding-invariant" in rows["mlsa4rec --config mlsa4rec-causal"]
    assert rows["mlsa4rec --config mlsa4rec-ablation-no-norm-layers"].split()[3] == "71,040"
    assert {"lightsans", "mlsa4rec --config mlsa4rec-ablation-no-lsa"} <= set(rows)
    code, _, err = run(capsys, "models", "--params", "--n-items", "0")
    assert code == 2 and "--n-items" in err


def test_data_stats_json(capsys, successor_file: Path) -> None:
    code, out, _ = run(capsys, "data", "stats", str(successor_file), "--json")
    stats = json.loads(out)
    assert code == 0 and stats["users"] == 300 and stats["items"] == 30
    assert stats["max_length"] <= 14 and stats["min_length"] >= 6


def test_train_then_evaluate(capsys, successor_file: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    code, out, _ = run(capsys, "train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir",
                       str(out_dir), "--set", "epochs=2", "--set", "hidden_size=16", "--set", "n_heads=1")
    assert code == 0 and "ndcg@10" in out and "test" in out
    code, out2, _ = run(capsys, "evaluate", "--run-dir", str(out_dir), "--json")
    default = json.loads(out2)
    assert code == 0 and set(default) == {"model", "dataset", "exclude_history", "valid", "test"}
    ranked, excluded = (json.loads(run(capsys, "evaluate", "--run-dir", str(out_dir), "--json", "--history", rule)[1])
                        for rule in ("ranked", "excluded"))
    assert default == ranked and default["exclude_history"] is False and excluded["exclude_history"] is True
    for split in ("valid", "test"):  # leaving history items out only removes competitors of the target
        assert all(excluded[split][m] >= ranked[split][m] for m in ranked[split])
        assert excluded[split]["hit@5"] > ranked[split]["hit@5"]


def test_compare_scores_every_run_under_one_history_rule(capsys, successor_file: Path, tmp_path: Path) -> None:
    tiny = ["--model", "gru4rec", "--dataset", str(successor_file), "--set", "epochs=1", "--set", "hidden_size=16"]
    ranked, excluded = tmp_path / "ranked", tmp_path / "excluded"
    assert run(capsys, "train", *tiny, "--output-dir", str(ranked))[0] == 0
    assert run(capsys, "train", *tiny, "--set", "exclude_history=true", "--output-dir", str(excluded))[0] == 0
    code, _, err = run(capsys, "compare", str(ranked), str(excluded), "--resamples", "100")
    assert code == 2 and "different history rules" in err and "--history" in err
    for rule in ("ranked", "excluded"):
        code, out, _ = run(capsys, "compare", str(ranked), str(excluded), "--resamples", "100", "--json",
                           "--history", rule)
        result = json.loads(out)
        assert code == 0 and result["exclude_history"] is (rule == "excluded")
        want = json.loads(run(capsys, "evaluate", "--run-dir", str(ranked), "--json", "--history", rule)[1])["test"]
        assert result["comparisons"][0]["baseline"] == pytest.approx(want["hit@10"])
        # the same weights (one seed, one epoch) under one rule: no difference at all
        assert all(row["candidate"] == pytest.approx(row["baseline"]) for row in result["comparisons"])


def test_compare_runs(capsys, successor_file: Path, tmp_path: Path) -> None:
    tiny = ["--set", "epochs=1", "--set", "hidden_size=16", "--dataset"]
    runs = {m: tmp_path / m for m in ("gru4rec", "sasrec")}
    for model, out_dir in runs.items():
        extra = ["--set", "n_heads=1"] if model == "sasrec" else []
        assert run(capsys, "train", "--model", model, "--output-dir", str(out_dir), *extra, *tiny,
                   str(successor_file))[0] == 0
    other = write_user_lines(tmp_path / "other.txt", successor_sequences(200, 30, seed=9))
    code, _, _ = run(capsys, "train", "--model", "gru4rec", "--output-dir", str(tmp_path / "other"), *tiny, str(other))
    assert code == 0
    code, out, _ = run(capsys, "compare", str(runs["gru4rec"]), str(runs["sasrec"]), "--resamples", "200", "--json")
    result = json.loads(out)
    assert code == 0 and result["users"] == 300 and result["baseline"]["model"] == "gru4rec"
    assert [r["metric"] for r in result["comparisons"]] == ["hit@10", "ndcg@10", "mrr@10"]
    evaluated = {m: json.loads(run(capsys, "evaluate", "--run-dir", str(d), "--json")[1])["test"]
                 for m, d in runs.items()}
    for row in result["comparisons"]:
        assert row["model"] == "sasrec" and row["p_holm"] >= row["p_value"]
        assert row["baseline"] == pytest.approx(evaluated["gru4rec"][row["metric"]])
        assert row["candidate"] == pytest.approx(evaluated["sasrec"][row["metric"]])
    code, out, _ = run(capsys, "compare", str(runs["gru4rec"]), str(runs["sasrec"]), "--metrics", "ndcg@5",
                       "--resamples", "200")
    assert code == 0 and "baseline: " in out and "ndcg@5" in out and "p (Holm)" in out
    for argv, message in [([str(runs["gru4rec"])], "at least one more"),
                          ([str(runs["gru4rec"]), str(tmp_path / "other")], "other data"),
                          ([str(runs["gru4rec"]), str(runs["sasrec"]), "--metrics", "ndcg"], "NAME@K"),
                          ([str(runs["gru4rec"]), str(runs["sasrec"]), "--resamples", "5"], "--resamples")]:
        code, _, err = run(capsys, "compare", *argv)
        assert code == 2 and message in err, (argv, err)


def _bad_inputs(tmp_path: Path, successor_file: Path) -> list[tuple[list[str], str]]:
    malformed = tmp_path / "bad.inter"
    malformed.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\t3\t4\t5\n")
    non_int = tmp_path / "bad.txt"
    non_int.write_text("1 2 3\n2 3 four\n")
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("1,1,1\n1,2,2\n2,1,3\n")
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes(b"\xff\xfe epochs: 3")
    facts = tmp_path / "facts.yaml"
    facts.write_text(f"model: gru4rec\ndataset: {successor_file}\n")
    train = ["train", "--model", "sasrec", "--output-dir", str(tmp_path / "out"), "--dataset"]
    return [
        (train + [str(tmp_path / "missing.txt")], "missing.txt' does not exist"),
        (train + ["ml-100m"], "unknown dataset 'ml-100m'"),
        (["train", "--model", "gpt", "--dataset", str(successor_file), "--output-dir", str(tmp_path / "out")],
         "unknown model 'gpt'"),
        (train + [str(malformed)], "malformed"),
        (train + [str(non_int)], "'four' is not an integer"),
        (train + [str(tiny)], "leaves no interactions"),
        (train + [str(successor_file), "--set", "epoch=3"], "unknown config key 'epoch'"),
        (train + [str(successor_file), "--set", "learning_rate=fast"], "learning_rate: expected float"),
        (train + [str(successor_file), "--set", "learning_rate=.inf"], "learning_rate must be a finite number"),
        (train + [str(successor_file), "--set", "learning_rate=1e-3", "--set", "epochs=1e9", "--set", "lr=1"],
         "unknown config key 'lr'"),  # the number spellings before it were accepted
        (train + [str(successor_file), "--set", "model=gru4rec"], "--set model=gru4rec but the command trains "
         "'sasrec'; remove it or pass --model gru4rec"),
        (train + [str(successor_file), "--config", str(tmp_path / "nope.yaml")], "does not exist"),
        (train + [str(successor_file), "--config", str(utf16)], "is not UTF-8 text"),
        (train + [str(successor_file), "--config", str(tmp_path)], "is a directory"),
        (["train", "--output-dir", str(tmp_path / "out"), "--dataset", str(successor_file)],
         "--model is required (or a model: line in a --config file)"),
        (["train", "--model", "sasrec", "--output-dir", str(tmp_path / "out")],
         "--dataset is required (or a dataset: line in a --config file)"),
        (["train", "--output-dir", str(tmp_path / "out"), "--config", str(facts), "--set", "epoch=3"],
         "unknown config key 'epoch' for model 'gru4rec'"),  # model and dataset taken from the file
        (["evaluate", "--run-dir", str(tmp_path)], "not a run directory"),
        (["train", "--model", "sasrec", "--dataset", str(successor_file), "--output-dir", str(tiny / "run"),
          "--set", "epochs=1"], "cannot create the output directory"),
        (["data", "stats", "ml-1m", "--data-dir", str(tmp_path / "nowhere")], "does not exist"),
    ]


def test_bad_inputs_fail_cleanly(capsys, tmp_path: Path, successor_file: Path) -> None:
    before = sorted(cache_dir().rglob("*")) if cache_dir().exists() else []
    for argv, message in _bad_inputs(tmp_path, successor_file):
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("error: ") and message in err, (argv, err)
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.glob(".out.partial*"))
    after = sorted(cache_dir().rglob("*"))
    new = [p for p in after if p not in before and not p.name.startswith("succ-")]
    assert new == [], new


def test_help_is_useful() -> None:
    env = {**os.environ, "COLUMNS": "120"}
    out = subprocess.run([sys.executable, "-m", "mlsa4rec", "train", "--help"], capture_output=True, text=True,
                         env=env, check=True).stdout
    for flag in ("--model", "--dataset", "--output-dir", "--config", "--set", "--data-dir", ".inter", "ratings.dat"):
        assert flag in out


def test_quiet_before_or_after_the_command(capsys, tmp_path: Path) -> None:
    parser = build_parser()
    assert parser.parse_args(["models"]).quiet is False
    assert parser.parse_args(["-q", "models"]).quiet is True
    assert parser.parse_args(["models", "-q"]).quiet is True
    assert parser.parse_args(["models", "--quiet"]).quiet is True
    assert parser.parse_args(["data", "stats", "ml-1m", "-q"]).quiet is True
    assert parser.parse_args(["compare", "a", "b", "-q"]).quiet is True
    assert parser.parse_args(["train", "-q", "--model", "sasrec", "--dataset", "x", "--output-dir", "y"]).quiet
    code, _, err = run(capsys, "evaluate", "-q", "--run-dir", str(tmp_path))
    assert code == 2 and "not a run directory" in err


def test_help_names_presets_and_integer_txt_ids(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "packaged preset name such as mamba4rec-ml-1m" in out and "later ones win" in out
    assert "integer user and item ids" in out and "-q, --quiet" in out
    assert "integer user and item ids" in DATASET_HELP


@pytest.mark.realdata
def test_data_stats_real(capsys, shared_data: Path) -> None:
    expected = {"ml-1m": (6040, 3416, 999611), "amazon-beauty": (22363, 12101, 198502),
                "amazon-video-games": (24303, 10672, 231780)}
    for name, (users, items, inter) in expected.items():
        code, out, _ = run(capsys, "data", "stats", name, "--data-dir", str(shared_data), "--json")
        stats = json.loads(out)
        assert code == 0 and (stats["users"], stats["items"], stats["interactions"]) == (users, items, inter)
