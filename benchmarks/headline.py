"""The README's results section, from the reproduction study's report (issue 26): the claim's
verdict per model and the headline table, written between two marker lines of README.md so that the
README never shows a number the committed report does not hold (a test rebuilds it from the report).

    mlsa4rec study report studies/reproduction --out docs/results/study
    python benchmarks/headline.py docs/results/study/report.json --readme README.md

The table has, per dataset of the main grid, the models the study is about (its focus), its
baseline and the strongest of the others: HR@10 and NDCG@10 as mean ± std over the seeds that
have finished, under RecBole's rule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import table

START = "<!-- results: written by benchmarks/headline.py from docs/results/study/report.json -->"
END = "<!-- results: end -->"
REPORT = "docs/results/study"


def headline_models(report: dict[str, Any], t: dict[str, Any]) -> list[str]:
    """The rows of a table the headline shows: the claim's models, its baseline, the strongest other."""
    claim = report.get("claim") or {}
    focus = claim.get("models") or [c["model"] for c in t.get("against_best_other", [])]
    wanted = [*focus, claim.get("baseline") or t.get("baseline"), t.get("best_other")]
    present = [r["model"] for r in t["rows"]]
    return [m for m in dict.fromkeys(wanted) if m in present]


def render(report: dict[str, Any]) -> str:
    """The section's body (between the markers) from a study report."""
    finished, left = len(report["cells"]), len(report["missing"])
    state = f"is under way: {finished} of {finished + left} cells have finished" if left else \
        f"is complete: all {finished} cells have finished"
    lines = [f"The reproduction study (`{report['file']}`, issue 26) {state}. Its report, with every table, "
             f"paired test, caveat and the command of each cell, is [{REPORT}/report.md]({REPORT}/report.md).", ""]
    claim = report.get("claim")
    if claim:
        lines += [f"The paper claims, against `{claim['baseline']}`, " + ", ".join(
            f"{m} {lo:+.1f}% to {hi:+.1f}%" for m, (lo, hi) in claim["percent"].items()) + ". So far:", ""]
        lines += [f"- {s['sentence']}" for s in claim["summary"]] + [""]
    rows = []
    for t in report["tables"]:
        if t["group"] != "main":
            continue
        for model in headline_models(report, t):
            r = next(x for x in t["rows"] if x["model"] == model)
            rows.append([t["dataset"], model, len(r["seeds"]), *(_mean_std(r["metrics"][k]) for k in ("hit@10",
                                                                                                     "ndcg@10"))])
    if rows:
        lines += [table(["dataset", "model", "seeds", "HR@10", "NDCG@10"], rows, align="llrrr"), ""]
        lines += [f"![HR@10 per model and dataset]({REPORT}/bars-hit10.png)", ""]
    return "\n".join(lines).rstrip() + "\n"


def _mean_std(pair: list[float | None]) -> str:
    mean, std = pair
    return f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")


def replace_section(readme: str, body: str) -> str:
    """``readme`` with the text between the marker lines replaced by ``body``."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise ValueError(f"the README needs the line {START!r} once, and after it the line {END!r}")
    head, rest = readme.split(START, 1)
    return f"{head}{START}\n{body}{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", help="a study's report.json (mlsa4rec study report)")
    p.add_argument("--readme", help="write the section into this README (between its marker lines)")
    args = p.parse_args(argv)
    try:
        body = render(json.loads(Path(args.report).read_text(encoding="utf-8")))
        if args.readme:
            readme = Path(args.readme)
            text = replace_section(readme.read_text(encoding="utf-8"), body)
            from mlsa4rec.fileio import write_text_atomic

            write_text_atomic(readme, text)
    except (KeyError, TypeError, AttributeError) as exc:
        print(f"error: {args.report!r} is not a study report (it lacks {exc}); make it with `mlsa4rec study report`",
              file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(body, end="")


if __name__ == "__main__":
    main()
