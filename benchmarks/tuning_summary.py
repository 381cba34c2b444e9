"""Several tunings side by side: each model's best recipe, what it scored, and the budget it took.

Reads the ``trials.json`` that ``mlsa4rec tune`` leaves in each tuning directory (it is rewritten
after every call, so this works on a tuning still in progress and on committed directories whose
trial runs are gone). The page says whether the tunings had an equal budget (the same number of
finished trials; their compute in hours beside it), so that a recipe advantage is not read as a
model advantage.

    python benchmarks/tuning_summary.py tuning/sasrec-beauty tuning/mamba4rec-beauty \
        tuning/mlsa4rec-causal-beauty --out docs/results/tuning_beauty

Writes OUT.json and OUT.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import command, table, write_report


def summary(directory: str) -> dict[str, Any]:
    path = Path(directory) / "trials.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(f"error: cannot read {str(path)!r} ({type(exc).__name__}); pass a directory that `mlsa4rec tune` made",
              file=sys.stderr)
        raise SystemExit(2) from None
    best = data.get("best") or {}
    test = best.get("test", {})
    return {"directory": str(directory), "model": data["model"], "dataset": Path(str(data["dataset"])).name,
            "wanted": data["trials_wanted"], "finished": data["finished"], "complete": data["complete"],
            "pruned": data["pruned"], "failed": data["failed"], "epochs": data["epochs"],
            "hours": round(data["seconds"] / 3600, 2), "metric": data["metric"], "best_trial": best.get("trial"),
            "best_valid": best.get("value"), "best_test": test, "best_params": best.get("params", {}),
            "fixed": data.get("set", {}), "configs": [Path(c).name for c in data.get("config", [])]}


def page(report: dict[str, Any]) -> str:
    rows = report["tunings"]
    equal = len({r["finished"] for r in rows}) == 1 and all(r["finished"] >= r["wanted"] for r in rows)
    body = []
    for r in rows:
        t = r["best_test"]
        body.append([r["model"], r["dataset"], f"{r['finished']} of {r['wanted']}", f"{r['complete']} / {r['pruned']}",
                     r["epochs"], f"{r['hours']:.2f}",
                     "-" if r["best_valid"] is None else f"{r['best_valid']:.4f}",
                     f"{t['hit@10']:.4f}" if "hit@10" in t else "-", f"{t['ndcg@10']:.4f}" if "ndcg@10" in t else "-",
                     ", ".join(f"{k}={_shown(v)}" for k, v in r["best_params"].items()) or "-"])
    verdict = ("Every tuning finished the same number of trials: an equal budget in trials (hours differ with each "
               "model's epoch cost and pruning)." if equal else
               "**The budgets are not equal yet** (a tuning is unfinished or finished a different number of trials): "
               "do not compare these models' best results as the models' own until they are.")
    return (f"# Tunings side by side\n\n{verdict} Valid: the tuning's objective on the validation split; test: the "
            "best trial's own test metrics (one seed, selected on validation).\n\n"
            f"```bash\n{report['command']}\n```\n\n"
            + table(["model", "dataset", "trials", "complete / pruned", "epochs", "hours", "best valid", "test HR@10",
                     "test NDCG@10", "best settings"], body, align="llrrrrrrrl") + "\n")


def _shown(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", metavar="TUNE_DIR", help="directories `mlsa4rec tune --dir` made")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    report = {"command": command("tuning_summary.py", argv), "tunings": [summary(d) for d in args.dirs]}
    text = page(report)
    print(text)
    if args.out:
        write_report(args.out, report, text)


if __name__ == "__main__":
    main()
