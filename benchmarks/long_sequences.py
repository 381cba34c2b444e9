"""The long-sequence page (issue 26, block 4): cost and accuracy of SASRec, Mamba4Rec and the causal
MLSA4Rec on ML-1M against L.

Cost comes from a quiet ``epoch_time.py --study studies/long-sequences.yaml --isolate`` JSON (each
case in a process of its own, so its peak memory is its own): seconds of a training epoch and of a
validation, and the memory a training step and a validation add to what the process held before
(the data and the model), each plotted against L on log-log axes with its fitted slope, the
exponent b of cost ~ L^b. Accuracy comes from the long-sequence study's records where its cells
have finished: test NDCG@10 and HR@10 for all users and for the quarter with the longest
histories (the same users at every L), under RecBole's rule.

    python benchmarks/epoch_time.py --study studies/long-sequences.yaml --dataset ml-1m --data-dir ../shared/data \
        --steps 6 --isolate --json docs/results/epoch_time_long_sequences_isolated.json
    python benchmarks/long_sequences.py docs/results/epoch_time_long_sequences_isolated.json \
        --study studies/long-sequences --out docs/results/long_sequences

Under the all-positions recipe an epoch covers every event once at any L (each user's history cut
into windows of L), so a model whose cost per event does not grow with L has a slope near 0 in
seconds per epoch, and one whose cost per event grows as L (attention) a slope near 1; most ML-1M
users have fewer than 500 events, so trimmed batches pay little for L beyond them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import command, table, write_report
from mlsa4rec.errors import MLSA4RecError

MIB = 2.0 ** 20


def cost_rows(timing: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per case of an ``epoch_time.py --study`` JSON: model, L, training and validation
    seconds and the memory each adds (None where the JSON lacks it)."""
    rows = []
    for r in timing["results"]:
        before = r.get("rss_before_bytes")

        def added(key: str, r: dict[str, Any] = r, before: int | None = before) -> int | None:
            return None if before is None or r.get(key) is None else max(int(r[key]) - int(before), 0)

        train = r.get("measured_s_per_epoch", r["projected_s_per_epoch"])
        steps = [x for x in (added("peak_train_rss_bytes"), added("peak_widest_step_rss_bytes")) if x is not None]
        rows.append({"model": r["case"].split("/")[0], "L": int(r["L"]), "train_s": float(train),
                     "measured": "measured_s_per_epoch" in r, "valid_s": float(r["valid_seconds"]),
                     "widest_batch": r.get("widest_batch"), "train_added_bytes": max(steps, default=None),
                     "valid_added_bytes": added("peak_valid_rss_bytes"), "samples": r.get("samples")})
    return sorted(rows, key=lambda x: (x["model"], x["L"]))


def plot_rows(rows: list[dict[str, Any]], phase: str, dataset: str) -> list[dict[str, Any]]:
    """``rows`` as ``plots.plot_cost_vs_length`` reads them, for the training or validation phase."""
    return [{"dataset": f"{dataset}, {phase}", "model": r["model"], "max_seq_length": r["L"],
             "seconds_per_epoch": r[f"{phase}_s"], "peak_memory_bytes": r[f"{phase}_added_bytes"]} for r in rows]


def accuracy(study_dir: str) -> dict[tuple[str, int], dict[str, Any]]:
    """(model, L) -> test metrics for all users and the longest-history quarter, from the study's
    finished records (mean over seeds); empty where none has finished."""
    from mlsa4rec.experiments.report import build_report

    report = build_report(study_dir, n_resamples=200)
    out = {}
    for t in report["tables"]:
        for r in t["rows"]:
            shown = r["model"] if t["group"] == "main" else f"{r['model']} ({t['group']})"  # as report cells name it
            length = next(c["max_seq_length"] for c in report["cells"] if c["model"] == shown)
            out[(r["model"], length)] = {"all": {k: r["metrics"][k][0] for k in ("hit@10", "ndcg@10")},
                                         "longest": ({k: r["metrics_longest"][k][0] for k in ("hit@10", "ndcg@10")}
                                                     if "metrics_longest" in r else None),
                                         "epochs": r["epochs"], "best_epoch": r.get("best_epoch"),
                                         "quarter": t.get("longest")}
    return out


def page(report: dict[str, Any]) -> str:
    rows = report["cost"]
    lines = ["# Long sequences: SASRec, Mamba4Rec and causal MLSA4Rec on ML-1M against L (issue 26)", "",
             f"Cost: `epoch_time.py` as below ({report['timing']['threads']} threads, "
             f"{report['timing']['machine']['cpu']}; with `--isolate`, each case in a process of its own); "
             "training seconds are a whole epoch where marked *measured*, else projected from the timed steps. "
             "Memory is the most that training (the timed steps, and one step on the epoch's widest batch, "
             "its longest windows) or a validation adds to the process's resident memory before the case (data "
             "and model loaded). The recipe trains on every position of each window of L "
             "(`configs/*-ml-1m-quick.yaml`), so an epoch covers every event once at any L.", "",
             f"```bash\n{report['timing']['command']}\n{report['command']}\n```", "",
             table(["model", "L", "windows", "widest batch", "training s/epoch", "validation s", "training adds",
                    "validation adds"],
                   [[r["model"], r["L"], f"{r['samples']:,}" if r["samples"] else "-",
                     "{} x {}".format(*r["widest_batch"]) if r["widest_batch"] else "-",
                     f"{r['train_s']:.1f}" + (" (measured)" if r["measured"] else ""), f"{r['valid_s']:.1f}",
                     _mib(r["train_added_bytes"]), _mib(r["valid_added_bytes"])] for r in rows], align="lrrrrrrr"),
             "", "Fitted slopes (the exponent b of cost ~ L^b over the lengths measured; 0: flat, 1: linear):", "",
             table(["model", "training s", "training memory", "validation s", "validation memory"],
                   [[m, *(_slope(report["slopes"][phase].get(m, {}).get(k))
                          for phase in ("train", "valid") for k in ("seconds_per_epoch", "peak_memory_bytes"))]
                    for m in dict.fromkeys(r["model"] for r in rows)], align="lrrrr"), ""]
    lines += [f"![cost against L, training]({Path(report['figures']['train']).name})",
              f"![cost against L, validation]({Path(report['figures']['valid']).name})", ""]
    acc = report["accuracy"]
    lines += ["## Accuracy", ""]
    if not acc:
        lines += ["No cell of the long-sequence study has finished yet: `mlsa4rec study run "
                  "studies/long-sequences.yaml` trains them (1 seed, a fixed 20-epoch cosine schedule, "
                  "`configs/*-ml-1m-quick.yaml`), then rerun this page.", ""]
    else:
        quarter = next((a["quarter"] for a in acc.values() if a["quarter"]), None)
        lines += ["Test split, RecBole's rule, one seed" + (f"; the longest-history quarter is {quarter['users']:,} "
                  f"of {quarter['of']:,} users with at least {quarter['min_history']} events before the test item"
                  if quarter else "") + ":", "",
                  table(["model", "L", "NDCG@10 all", "HR@10 all", "NDCG@10 longest quarter",
                         "HR@10 longest quarter", "epochs: best / run"],
                        [[m, length, f"{a['all']['ndcg@10']:.4f}", f"{a['all']['hit@10']:.4f}",
                          *([f"{a['longest']['ndcg@10']:.4f}", f"{a['longest']['hit@10']:.4f}"] if a["longest"]
                            else ["-", "-"]),
                          ("-" if a["best_epoch"] is None else f"{a['best_epoch']:.0f}") + f" / {a['epochs']:.0f}"]
                         for (m, length), a in sorted(acc.items())], align="lrrrrrr"), ""]
    return "\n".join(lines)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f} MiB"


def _slope(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("timing", help="an epoch_time.py --study ... --isolate JSON")
    p.add_argument("--study", help="the long-sequence study directory, for accuracy (its finished cells)")
    p.add_argument("--out", help="write OUT.json, OUT.md and the figures OUT-train/-valid.{png,svg}")
    args = p.parse_args(argv)
    try:
        timing = json.loads(Path(args.timing).read_text())
        rows = cost_rows(timing)
        acc = accuracy(args.study) if args.study else {}
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {args.timing!r} is not an epoch_time.py JSON ({exc}); make it with the command in this "
              "script's docstring", file=sys.stderr)
        raise SystemExit(2) from None
    except MLSA4RecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from mlsa4rec.experiments.plots import plot_cost_vs_length

    out = args.out or "long_sequences"
    figures, slopes = {}, {}
    for phase in ("train", "valid"):
        plotted = plot_cost_vs_length(plot_rows(rows, phase, timing["dataset"]), f"{out}-{phase}")
        figures[phase] = str(plotted.paths[0])
        slopes[phase] = next(iter(plotted.slopes.values()))
    report = {"command": command("long_sequences.py", argv), "timing": {k: timing.get(k) for k in
                                                                         ("command", "machine", "threads")},
              "cost": rows, "slopes": slopes, "figures": figures,
              "accuracy": {f"{m}@{length}": a for (m, length), a in acc.items()}}
    text = page({**report, "accuracy": acc})
    print(text)
    if args.out:
        write_report(args.out, report, text)


if __name__ == "__main__":
    main()
