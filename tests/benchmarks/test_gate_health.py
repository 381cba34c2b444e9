"""benchmarks/gate_health.py: a trained MLSA4Rec's gate at initialisation and after training."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mlsa4rec.training.run import train

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py from beside them
_spec = importlib.util.spec_from_file_location("gate_health", REPO / "benchmarks" / "gate_health.py")
gh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gh)

TINY = {"epochs": 2, "hidden_size": 16, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 10, "train_batch_size": 64,
        "learning_rate": 0.01, "seed": 3}


def test_the_gate_before_and_after_training(successor_file: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    train("mlsa4rec", str(successor_file), run_dir, overrides={**TINY, "variant": "causal"})
    gh.main([str(run_dir), "--out", str(tmp_path / "gate")])
    report = json.loads((tmp_path / "gate.json").read_text())
    (result,) = report["results"]
    assert (result["variant"], result["gate_act"]) == ("causal", "gelu")
    (layer,) = result["layers"]
    init, trained = layer["initialisation"], layer["trained"]
    assert init["values"] == trained["values"] == result["users"] * 16
    assert init["histogram"]["edges"] == trained["histogram"]["edges"]  # shared bins
    assert init["mean"] != trained["mean"]  # two epochs at lr 0.01 moved W1
    assert (tmp_path / "gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| run |" in (tmp_path / "gate.md").read_text() and "gate.png" in (tmp_path / "gate.md").read_text()
    capsys.readouterr()
    # the initialisation is the run's own: the same command gives the same numbers
    gh.main([str(run_dir)])
    assert gh.run_gates(str(run_dir), None, 1024)["layers"][0]["initialisation"]["mean"] == init["mean"]


def test_a_run_of_another_model_is_one_error_line(successor_file: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    train("gru4rec", str(successor_file), run_dir, overrides={"epochs": 1, "embedding_size": 8, "hidden_size": 8})
    with pytest.raises(SystemExit) as exit_:
        gh.main([str(run_dir)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gru4rec run" in err and err.count("\n") == 1


def test_add_keeps_the_runs_measured_before_and_replaces_one_measured_again(successor_file: Path, tmp_path: Path,
                                                                           capsys) -> None:
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "gate"
    train("mlsa4rec", str(successor_file), first, overrides={**TINY, "variant": "causal"})
    train("mlsa4rec", str(successor_file), second, overrides={**TINY, "variant": "masked", "seed": 4})
    gh.main([str(first), "--out", str(out)])
    before = json.loads((tmp_path / "gate.json").read_text())["results"]
    gh.main([str(second), "--out", str(out), "--add"])  # (the first run's directory may be gone by now)
    report = json.loads((tmp_path / "gate.json").read_text())
    assert [r["run"] for r in report["results"]] == [str(first), str(second)]
    assert report["results"][0]["layers"] == before[0]["layers"]
    page = (tmp_path / "gate.md").read_text()
    assert page.count("python benchmarks/gate_health.py") == 2 and "--add" in page  # each row's own command
    gh.main([str(first), "--out", str(out), "--add"])  # measured again: replaced, not twice
    assert sorted(r["run"] for r in json.loads((tmp_path / "gate.json").read_text())["results"]) == sorted(
        [str(first), str(second)])
    capsys.readouterr()
    (tmp_path / "junk.json").write_text('{"rows": []}')
    with pytest.raises(SystemExit) as exit_:
        gh.main([str(first), "--out", str(tmp_path / "junk"), "--add"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --add: ") and "not a gate_health.py report" in err and err.count("\n") == 1
    assert (tmp_path / "junk.json").read_text() == '{"rows": []}'  # left as it was


def test_the_verdict_follows_the_numbers() -> None:
    def result(low: float, high: float | None, near: float) -> dict:
        state = {"saturated_low": low, "saturated_high": high, "near_zero": near, "mean": 0.1}
        return {"layers": [{"initialisation": {**state, "near_zero": 0.1}, "trained": state}]}

    calm = gh.verdict([result(0.0, None, 0.15), result(0.002, 0.001, 0.2)])
    assert "2 trained run(s) the gate does not saturate" in calm and "at most 0.2 %" in calm
    assert "15.0-20.0 % of its values are near 0" in calm and "against 10.0-10.0 %" in calm
    assert "gate saturates (above 1.0 %)" in gh.verdict([result(0.0, 0.3, 0.1)])
