"""`mlsa4rec plot` and the study plots: PNG and SVG files a README can show, the runs named in
them, one error line for a metric a run did not record or a directory that is not a run, and the
log-log slope of cost against L read right (cost ~ L^2 prints slope 2.00)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from conftest import successor_sequences, write_user_lines
from mlsa4rec.cli import main
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.experiments.plots import figure_paths, plot_bars, plot_cost_vs_length, plot_curves, plot_vs_length
from mlsa4rec.runs.loading import load_run_config
from mlsa4rec.training.run import train

SMALL = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "hidden_dropout_prob": 0.2,
         "attn_dropout_prob": 0.2, "MAX_ITEM_LIST_LENGTH": 8, "learning_rate": 0.01, "epochs": 3,
         "train_batch_size": 32, "stopping_step": 100, "seed": 11, "eval_batch_size": 64}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny finished runs (3 epochs each) on the successor data of ``successor_file``."""
    root = tmp_path_factory.mktemp("runs")
    data = write_user_lines(root / "succ.txt", successor_sequences(300, 30, seed=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train("sasrec", str(data), root / "run-a", overrides=SMALL)
        train("sasrec", str(data), root / "run-b", overrides={**SMALL, "seed": 12, "learning_rate": 0.005})
    finally:
        torch.set_num_threads(threads)
    return root / "run-a", root / "run-b"


def svg_text(path: Path) -> str:
    """Every text of an SVG (which must parse as XML), joined by newlines."""
    return "\n".join(t for t in ET.parse(path).getroot().itertext() if t.strip())


def assert_figures(paths: list[Path], stem: Path) -> str:
    """``stem``.png is a PNG, ``stem``.svg parses as XML, no temporary file is left; the SVG's text."""
    assert paths == [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC and paths[0].stat().st_size > 10_000
    assert sorted(p.name for p in stem.parent.iterdir() if p.name.startswith((stem.name, "." + stem.name))) == \
        sorted(p.name for p in paths)
    return svg_text(paths[1])


def test_curves_are_a_png_and_an_svg_naming_each_run_and_the_metric(runs, tmp_path: Path) -> None:
    text = assert_figures(plot_curves(runs, tmp_path / "curves"), tmp_path / "curves")
    assert "run-a (sasrec)" in text and "run-b (sasrec)" in text
    assert "validation ndcg@10" in text and "training loss" in text and "epoch" in text
    text = assert_figures(plot_curves(runs[:1], tmp_path / "hit.svg", metric="HIT@5"), tmp_path / "hit")
    assert "validation hit@5" in text and "run-b" not in text


def test_cli_prints_the_paths_it_wrote(runs, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "fig.png"
    assert main(["plot", str(runs[0]), str(runs[1]), "--out", str(out), "--metric", "mrr@10"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "fig.png"), str(tmp_path / "fig.svg")]
    assert "validation mrr@10" in svg_text(tmp_path / "fig.svg")
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(runs[0]), "-q"]) == 0  # default --out: curves in the working directory
    assert capsys.readouterr().out.splitlines() == ["curves.png", "curves.svg"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and captured.out == "", captured.err
    return lines[0]


def test_a_metric_a_run_did_not_record_is_one_error_line(runs, tmp_path: Path, capsys) -> None:
    assert main(["plot", *map(str, runs), "--metric", "hit@50", "--out", str(tmp_path / "x")]) == 2
    line = _one_error_line(capsys)
    assert "'hit@50'" in line and "run-a" in line and "hit@10" in line  # names what it did record
    assert list(tmp_path.iterdir()) == []


def test_a_directory_that_is_not_a_run_is_one_error_line_as_every_command_gives(runs, tmp_path: Path,
                                                                              capsys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MLSA4RecError) as expected:
        load_run_config(tmp_path / "empty")
    assert main(["plot", str(runs[0]), str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert _one_error_line(capsys) == f"error: {expected.value}"
    assert not (tmp_path / "x.png").exists()


def test_figure_paths_keep_other_suffixes_and_refuse_a_directory(tmp_path: Path) -> None:
    assert figure_paths("a/b.SVG") == (Path("a/b.png"), Path("a/b.svg"))
    assert figure_paths("curves.v2") == (Path("curves.v2.png"), Path("curves.v2.svg"))
    with pytest.raises(MLSA4RecError, match="is a directory"):
        figure_paths(tmp_path)


def _rows() -> list[dict]:
    """A synthetic study: two datasets, three models, L from 16 to 128; sasrec's cost ~ L^2, the
    others' ~ L; one seed for 'lonely' (no error bar), three for the others; no memory on 'cpu-data'."""
    rows = []
    for dataset in ("beauty", "cpu-data"):
        for model, power, seeds in (("sasrec", 2, 3), ("mamba4rec", 1, 3), ("lonely", 1, 1)):
            for length in (16, 32, 64, 128):
                for seed in range(seeds):
                    rows.append({"model": model, "dataset": dataset, "seed": seed, "max_seq_length": length,
                                 "metrics": {"test": {"hit@10": 0.1 + 0.01 * seed + length / 1e4,
                                                      "ndcg@10": 0.05 + 0.005 * seed}},
                                 "seconds_per_epoch": 0.01 * length ** power,
                                 "peak_memory_bytes": None if dataset == "cpu-data" else 1000 * length ** power})
    return rows


def test_cost_against_length_prints_the_fitted_log_log_slope(tmp_path: Path) -> None:
    paths, slopes = plot_cost_vs_length(_rows(), tmp_path / "cost")
    text = assert_figures(paths, tmp_path / "cost")
    assert round(slopes["beauty"]["sasrec"]["seconds_per_epoch"], 2) == 2.00
    assert round(slopes["beauty"]["sasrec"]["peak_memory_bytes"], 2) == 2.00
    assert round(slopes["beauty"]["mamba4rec"]["seconds_per_epoch"], 2) == 1.00
    assert slopes["cpu-data"]["sasrec"]["peak_memory_bytes"] is None
    assert "sasrec: slope 2.00" in text and "mamba4rec: slope 1.00" in text
    assert "no peak memory recorded" in text and "maximum sequence length L" in text


def test_bars_and_accuracy_against_length_name_every_dataset_and_model(tmp_path: Path) -> None:
    one_length = [r for r in _rows() if r["max_seq_length"] == 32]
    text = assert_figures(plot_bars(one_length, "ndcg@10", tmp_path / "bars"), tmp_path / "bars")
    for name in ("beauty", "cpu-data", "sasrec", "mamba4rec", "lonely", "3 seeds", "1 seed", "test ndcg@10"):
        assert name in text
    text = assert_figures(plot_bars(_rows(), "ndcg@10", tmp_path / "grouped"), tmp_path / "grouped")
    assert "L=16" in text and "L=128" in text and "lonely" in text  # groups by L, models in the legend
    text = assert_figures(plot_vs_length(_rows(), "hit@10", tmp_path / "length"), tmp_path / "length")
    assert "test hit@10" in text and "128" in text and "sasrec" in text and "beauty" in text


def test_a_metric_a_cell_did_not_record_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MLSA4RecError, match="has no test 'mrr@10'.*hit@10, ndcg@10"):
        plot_bars(_rows(), "mrr@10", tmp_path / "bars")
    with pytest.raises(MLSA4RecError, match="no finished cell"):
        plot_vs_length([], "hit@10", tmp_path / "length")
