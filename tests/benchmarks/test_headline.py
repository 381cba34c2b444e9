"""benchmarks/headline.py: the README's results section, rebuilt from the committed study report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import common.py from beside them
_spec = importlib.util.spec_from_file_location("headline", REPO / "benchmarks" / "headline.py")
headline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(headline)


def test_the_readme_shows_what_the_committed_report_holds() -> None:
    """A report regenerated without the README (or the README edited by hand) fails here."""
    report = json.loads((REPO / "docs" / "results" / "study" / "report.json").read_text())
    readme = (REPO / "README.md").read_text()
    assert headline.replace_section(readme, headline.render(report)) == readme, (
        "README.md's results section differs from docs/results/study/report.json: run "
        "python benchmarks/headline.py docs/results/study/report.json --readme README.md")


def test_the_section_names_the_focus_the_baseline_and_the_strongest_other() -> None:
    def row(model: str, seeds: list[int], ndcg: float) -> dict:
        std = 0.001 if len(seeds) > 1 else None
        return {"model": model, "seeds": seeds, "metrics": {"hit@10": [2 * ndcg, std], "ndcg@10": [ndcg, std]}}

    table = {"group": "main", "dataset": "beauty", "baseline": "base", "best_other": "strong",
             "rows": [row("weak", [1], 0.01), row("strong", [1], 0.03), row("base", [1, 2], 0.02),
                      row("mine", [1, 2], 0.04)],
             "against_best_other": [{"model": "mine", "metric": "ndcg@10"}]}
    long = {**table, "group": "long"}  # groups other than the main grid are not headline
    report = {"file": "s.yaml", "cells": [{}] * 6, "missing": [], "tables": [table, long]}
    body = headline.render(report)
    shown = [line.split("|")[2].strip() for line in body.splitlines() if line.startswith("| beauty")]
    assert shown == ["mine", "base", "strong"]
    assert "| beauty | mine | 2 | 0.0800 ± 0.0010 | 0.0400 ± 0.0010 |" in body and "| 0.0300 |" in body
    assert "is complete: all 6 cells" in body and "claims" not in body
    claimed = {**report, "missing": ["x"], "claim": {"models": ["weak"], "baseline": "base",
                                                     "percent": {"hit@10": [4.5, 10.8]},
                                                     "summary": [{"sentence": "`weak`: not reproduced."}]}}
    body = headline.render(claimed)
    assert [line.split("|")[2].strip() for line in body.splitlines() if line.startswith("| beauty")] == [
        "weak", "base", "strong"]
    assert "6 of 7 cells" in body and "hit@10 +4.5% to +10.8%" in body and "- `weak`: not reproduced." in body


def test_a_readme_without_its_markers_or_a_file_that_is_no_report_is_one_error_line(tmp_path: Path,
                                                                                     capsys) -> None:
    report = REPO / "docs" / "results" / "study" / "report.json"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    for args in ([str(report), "--readme", str(readme)], [str(readme)]):
        with pytest.raises(SystemExit) as exit_:
            headline.main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert readme.read_text() == "# x\n"  # nothing half-written
    bad = tmp_path / "report.json"
    bad.write_text('{"cells": []}')
    with pytest.raises(SystemExit):
        headline.main([str(bad)])
    assert "is not a study report" in capsys.readouterr().err
