"""A study's report, from its cells' records alone: accuracy over seeds, paired tests against a
baseline, cost, and the figures; Markdown for people and JSON for programs.

Each table is one group of cells on one dataset. Accuracy is recomputed from the stored test ranks,
so any cut-off K can be reported whatever the runs computed: under RecBole's rule (the user's
history items ranked with the others, as the papers compared here ran), beside it under the other
rule (history left out), and on the quarter of users with the longest histories where the records
carry history lengths (there with its own paired tests against the baseline).
A model is compared with the baseline user by user: each user's metric is first averaged over the
seeds both models have, then the paired t-test and bootstrap interval of ``compare_values`` run on
those averages, and the p-values of a table are Holm-adjusted together.
Where the study file states a paper's claim, each claimed change is tested the same way (Holm over
all of the claim's tests) and given a verdict (``claim_verdict``), and each model gets one plain
sentence: reproduced, partly, or not.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation.significance import compare_values, holm
from mlsa4rec.experiments.study import (
    COMPARED,
    MAIN,
    STUDY_JSON,
    Study,
    cell_command,
    check_not_stale,
    dataset_name,
    load_study,
    read_meta,
    read_record,
    shown_path,
)
from mlsa4rec.fileio import write_json_atomic, write_text_atomic
from mlsa4rec.metrics import metrics_from_ranks, per_user_metrics
from mlsa4rec.runtime import cpu_model

METRICS = ("hit", "ndcg", "mrr")
KS = (5, 10, 20)  # below study.RANK_CAP: exact from a record's capped ranks
ALPHA = 0.05  # a claim's verdict: a change counts where its Holm-adjusted p is below this


RULES = ("ranked", "excluded")  # RecBole's rule first: the tables' and the comparisons' own
LONGEST = 0.75  # the longest-history subset: users whose history is at least this quantile of lengths


def _ranks(arrays: dict[str, np.ndarray], rule: str = "ranked") -> np.ndarray:
    """The test ranks under history rule ``rule`` (every record holds both)."""
    return arrays[f"ranks_{rule}"].astype(np.int64)


def _longest(by_model: dict[str, list[tuple[dict, dict]]]) -> tuple[np.ndarray, int] | None:
    """The users of the longest-history quarter (a mask) and its shortest history, where every record
    of the table carries history lengths (records made before they did lack them)."""
    lengths = [a.get("history_lengths") for recs in by_model.values() for _, a in recs]
    if any(x is None for x in lengths):
        return None
    first = lengths[0].astype(np.int64)
    if any(not np.array_equal(first, x) for x in lengths):
        raise MLSA4RecError("the records of one table disagree on the users' history lengths; rebuild them from runs "
                            "on one copy of the data")
    threshold = int(np.quantile(first, LONGEST, method="lower"))
    return first >= threshold, threshold


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def build_report(root: str | Path, baseline: str | None = None, confidence: float = 0.95,
                 n_resamples: int = 10_000) -> dict[str, Any]:
    """The report of the study in ``root`` as one JSON-ready dict (see ``write_report``)."""
    root = Path(root)
    if not (root / STUDY_JSON).is_file():
        raise MLSA4RecError(f"{str(root)!r} is not a study directory (no {STUDY_JSON}); pass the directory a "
                            "`mlsa4rec study run` made")
    meta = read_meta(root)
    study = load_study(meta["file"], root, check=False)
    check_not_stale(study)  # no number from a run the study file no longer describes
    baseline = baseline or study.baseline
    if baseline is not None and baseline not in study.models:
        raise MLSA4RecError(f"baseline {baseline!r} is not a model of the study ({', '.join(study.models)})")
    records: dict[tuple[str, str], dict[str, list[tuple[dict, dict]]]] = defaultdict(lambda: defaultdict(list))
    missing = []
    for cell in study.cells:
        path = cell.record_path(root)
        if path.is_file():
            records[(cell.group, dataset_name(cell.dataset))][cell.entry.label].append(read_record(path))
        else:
            missing.append(cell.id)
    tables = []
    for (group, dataset), by_model in records.items():
        rows = []
        longest = _longest(by_model)
        for label, recs in by_model.items():
            per_seed = [metrics_from_ranks(_ranks(a), KS, METRICS) for m, a in recs]
            other = [metrics_from_ranks(_ranks(a, "excluded"), [10], METRICS) for m, a in recs]
            row = {"model": label, "seeds": sorted(m["seed"] for m, _ in recs),
                   "metrics": {k: _mean_std([p[k] for p in per_seed]) for k in per_seed[0]},
                   "metrics_excluded": {k: _mean_std([p[k] for p in other]) for k in other[0]},
                   "seconds_per_epoch": float(np.mean([m["seconds_per_epoch"] for m, _ in recs])),
                   "epochs": float(np.mean([m["epochs_run"] for m, _ in recs])),
                   "best_epoch": (None if any(m.get("best_epoch") is None for m, _ in recs)
                                  else float(np.mean([m["best_epoch"] for m, _ in recs]))),
                   "parameters": recs[0][0]["parameters"],
                   "peak_memory_bytes": max((m.get("peak_memory_bytes") or 0 for m, _ in recs), default=0) or None,
                   "runs": [m["run"] for m, _ in recs]}
            if longest is not None:
                sub = [metrics_from_ranks(_ranks(a)[longest[0]], [10], METRICS) for m, a in recs]
                row["metrics_longest"] = {k: _mean_std([p[k] for p in sub]) for k in sub[0]}
            rows.append(row)
        prints = {m.get("data_fingerprint") for recs in by_model.values() for m, _ in recs}
        if len(prints) > 1:
            raise MLSA4RecError(f"the runs of {dataset} ({group}) were trained on different data (their data "
                                "fingerprints differ), so their users cannot be paired; rebuild the records from "
                                "runs on one copy of the data")
        comparisons = _compare(by_model, baseline, confidence, n_resamples) if baseline in by_model else []
        best_other = _best_other(rows, study.focus, baseline)
        against_best = (_compare({k: v for k, v in by_model.items() if k in study.focus or k == best_other},
                                 best_other, confidence, n_resamples) if best_other is not None else [])
        subset = None if longest is None else {"users": int(longest[0].sum()), "of": int(longest[0].size),
                                                "min_history": longest[1]}
        # where long sequences should matter most: the same paired tests on those users alone
        on_longest = (_compare(by_model, baseline, confidence, n_resamples, users=longest[0])
                      if comparisons and longest is not None else [])
        tables.append({"group": group, "dataset": dataset, "rows": rows, "baseline": baseline if comparisons else None,
                       "comparisons": comparisons, "longest": subset, "comparisons_longest": on_longest,
                       "best_other": best_other if against_best else None, "against_best_other": against_best})
    # the figures group by model: a group's cells are their own series ("sasrec (long)"), except against L,
    # where a group that changes nothing but L continues its model's main series ("length_series")
    main = {(m["dataset"], m["model"]): _besides_length(m["settings"]) for (group, _), by_model in records.items()
            if group == MAIN for recs in by_model.values() for m, _ in recs}
    commands = {c.id: cell_command(c, study) for c in study.cells}
    cells = [{"cell": m["cell"], "group": m["group"], "seed": m["seed"], "dataset": m["dataset"],
              "model": m["model"] if m["group"] == MAIN else f"{m['model']} ({m['group']})",
              "length_series": (m["model"] if main.get((m["dataset"], m["model"])) == _besides_length(m["settings"])
                                else f"{m['model']} ({m['group']})"),
              "max_seq_length": m["settings"]["MAX_ITEM_LIST_LENGTH"], "run": shown_path(m["run"]),
              "command": commands.get(m["cell"]), "git_commit": m["git_commit"], "code": _code(m),
              "metrics": {"test": metrics_from_ranks(_ranks(a), KS, METRICS)},
              "seconds_per_epoch": m["seconds_per_epoch"], "peak_memory_bytes": m.get("peak_memory_bytes"),
              "peak_memory_kind": m.get("peak_memory_kind"), "machine": m.get("machine")}
             for by_model in records.values() for recs in by_model.values() for m, a in recs]
    program = Path(sys.argv[0]).name
    program = "mlsa4rec" if program in ("__main__.py", "mlsa4rec") else program  # python -m mlsa4rec: the same
    return {"study": study.name, "file": shown_path(study.file), "command": shlex.join([program, *sys.argv[1:]]),
            "machine": {"cpu": cpu_model(), "python": platform.python_version()},
            "trained_on": sorted({json.dumps(c["machine"], sort_keys=True) for c in cells if c["machine"]}),
            "commits": sorted({c for by_model in records.values() for recs in by_model.values() for m, _ in recs
                               for c in _commits(m)}), "tables": tables,
            "claim": _claim_report(study, records, confidence, n_resamples) if study.claim else None,
            "notes": list(study.notes),
            "not_run": [{"models": list(n.models), "datasets": list(n.datasets), "reason": n.reason}
                        for n in study.not_run],
            "cells": cells, "missing": missing, "missing_commands": {c: commands[c] for c in missing}}


def _besides_length(settings: dict[str, Any]) -> dict[str, Any]:
    """A cell's settings but its L and seed: equal for cells that are one model's series against L."""
    return {k: v for k, v in settings.items() if k not in ("MAX_ITEM_LIST_LENGTH", "seed")}


def _best_other(rows: list[dict[str, Any]], focus: tuple[str, ...], baseline: str | None) -> str | None:
    """The strongest model of a table outside ``focus`` and other than the baseline (highest mean
    NDCG@10 over its seeds), where the table holds a focus model and such a model to compare it with."""
    if not any(r["model"] in focus for r in rows):
        return None
    others = [r for r in rows if r["model"] not in focus and r["model"] != baseline]
    return max(others, key=lambda r: r["metrics"]["ndcg@10"][0])["model"] if others else None


def _compare(by_model: dict[str, list[tuple[dict, dict]]], baseline: str, confidence: float,
             n_resamples: int, users: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Every model against ``baseline`` on the seeds both have, each user's metric averaged over them
    (on the users of the mask ``users`` alone, if given); the p-values Holm-adjusted together."""
    labels, rows = _paired(by_model, baseline, COMPARED, confidence, n_resamples, users)
    return [{"model": label, "seeds": shared, **row.to_dict()} for (label, shared), row in zip(labels, holm(rows))]


def _paired(by_model: dict[str, list[tuple[dict, dict]]], baseline: str, metrics: tuple[str, ...],
            confidence: float, n_resamples: int,
            users: np.ndarray | None = None) -> tuple[list[tuple[str, list[int]]], list]:
    """The unadjusted paired comparisons of ``_compare``: ``([(model, shared seeds)], [result])``."""
    rows, labels = [], []

    def ranks(a: dict) -> np.ndarray:
        return _ranks(a) if users is None else _ranks(a)[users]

    base = {m["seed"]: ranks(a) for m, a in by_model[baseline]}
    for label, recs in by_model.items():
        if label == baseline:
            continue
        mine = {m["seed"]: ranks(a) for m, a in recs}
        shared = sorted(set(mine) & set(base))
        if not shared:
            continue
        for metric in metrics:
            name, k = metric.split("@")
            a = np.mean([per_user_metrics(base[s], [int(k)], [name])[metric].numpy() for s in shared], axis=0)
            b = np.mean([per_user_metrics(mine[s], [int(k)], [name])[metric].numpy() for s in shared], axis=0)
            rows.append(compare_values(a, b, metric, confidence, n_resamples))
            labels.append((label, shared))
    return labels, rows


def claim_verdict(relative: float | None, p_holm: float, claimed_low_percent: float) -> str:
    """One claimed change against the measured one: ``reproduced`` (a significant gain at least the
    claim's low end), ``partly`` (a significant gain, smaller than claimed), else ``not reproduced``,
    naming why."""
    if relative is None:
        return "not reproduced: undefined (the baseline scores 0)"
    if p_holm < ALPHA and relative > 0:
        return "reproduced" if 100 * relative >= claimed_low_percent else "partly: a smaller significant gain"
    if p_holm < ALPHA and relative < 0:
        return "not reproduced: significantly worse"
    return "not reproduced: no significant difference"


def _claim_report(study: Study, records: dict, confidence: float, n_resamples: int) -> dict[str, Any]:
    """The claim beside what the main grid measured: each model, dataset and claimed metric paired
    against the claim's baseline, Holm over all of them, a verdict each, and a sentence per model."""
    claim = study.claim
    metrics = tuple(claim.percent)
    left_out = {(m, d) for n in study.not_run for m in n.models for d in n.datasets}
    found, rows, missing = [], [], []
    for dataset in claim.datasets:
        by_model = records.get((MAIN, dataset), {})
        for model in claim.models:
            if model not in by_model or claim.baseline not in by_model:
                absent = model if model not in by_model else claim.baseline
                missing.append({"model": model, "dataset": dataset,
                                "why": "not run" if (absent, dataset) in left_out else f"{absent} not trained yet"})
                continue
            labels, results = _paired({m: by_model[m] for m in (claim.baseline, model)}, claim.baseline, metrics,
                                      confidence, n_resamples)
            found += [(dataset, label, seeds) for label, seeds in labels]
            rows += results
    out = []
    for (dataset, model, seeds), row in zip(found, holm(rows)):
        low, high = claim.percent[row.metric]
        out.append({"model": model, "dataset": dataset, "seeds": seeds, **row.to_dict(),
                    "claimed_percent": [low, high], "verdict": claim_verdict(row.relative, row.p_holm, low)})
    return {"source": claim.source, "models": list(claim.models), "baseline": claim.baseline,
            "percent": {k: list(v) for k, v in claim.percent.items()},
            "datasets": list(claim.datasets), "alpha": ALPHA, "rows": out, "missing": missing,
            "summary": [_claim_sentence(model, claim.baseline, [r for r in out if r["model"] == model],
                                        [m for m in missing if m["model"] == model])
                        for model in claim.models]}


def _claim_sentence(model: str, baseline: str, rows: list[dict[str, Any]],
                    missing: list[dict[str, str]]) -> dict[str, Any]:
    """A model's overall verdict on the claim, and the sentence that says it with its numbers."""
    gaps = "; ".join(f"{why} on {', '.join(m['dataset'] for m in missing if m['why'] == why)}"
                     for why in dict.fromkeys(m["why"] for m in missing))
    if not rows:
        return {"model": model, "verdict": "not measured",
                "sentence": f"`{model}` against `{baseline}`: not measured ({gaps})."}
    verdicts = [r["verdict"] for r in rows]
    if all(v == "reproduced" for v in verdicts):
        verdict = "reproduced"
    elif any(v == "reproduced" or v.startswith("partly") for v in verdicts):
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced"
    parts = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        changes = ", ".join(f"{r['metric']} {_relative(r)} (p {r['p_holm']:.2g}, {r['verdict']})"
                            for r in rows if r["dataset"] == dataset)
        seeds = len(next(r["seeds"] for r in rows if r["dataset"] == dataset))
        parts.append(f"On {dataset} ({seeds} shared seed{'s' if seeds != 1 else ''}): {changes}")
    where = f" where measured ({gaps})" if gaps else ""
    return {"model": model, "verdict": verdict,
            "sentence": f"`{model}` against `{baseline}`: **{verdict}**{where}. " + ". ".join(parts) + "."}


def _relative(row: dict[str, Any]) -> str:
    return "undefined" if row["relative"] is None else f"{row['relative']:+.1%}"


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables: accuracy (mean ± sample std over seeds), the paired tests
    against the baseline, cost; then where every number came from."""
    machines = "; ".join(_machine(json.loads(m)) for m in report["trained_on"])
    commits = ", ".join(report["commits"]) or "unknown"
    lines = [f"# Study `{report['study']}`", "",
             f"Made by `{report['command']}` from `{report['file']}`; code {commits}; trained on "
             f"{machines or 'unknown'}. Accuracy: test split, RecBole's rule (the user's history items are "
             "ranked with the others; the other rule follows each table), mean ± sample "
             "std over seeds (a dash: one seed). s/epoch: as the cells trained, other work possibly sharing the "
             "machine (quiet figures come from the benchmarks). Peak memory: the training process's peak resident "
             "memory on a CPU (it includes Python's and torch's own, about 0.5 GiB), the memory torch allocated on a "
             "GPU.", ""]
    if report.get("notes"):
        lines += ["Caveats:", ""] + [f"- {note}" for note in report["notes"]] + [""]
    if report.get("claim"):
        lines += _claim_lines(report["claim"])
    keys = [f"{m}@{k}" for m in METRICS for k in KS]
    for table in report["tables"]:
        lines += [f"## {table['dataset']} ({table['group']})", "",
                  "| model | seeds | " + " | ".join(keys)
                  + " | s/epoch | epochs: best / run | parameters | peak memory |",
                  "|---|---|" + "---|" * (len(keys) + 4)]
        for row in table["rows"]:
            cells = []
            for key in keys:
                mean, std = row["metrics"][key]
                cells.append(f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f} ± -")
            memory = f"{row['peak_memory_bytes'] / 2 ** 20:.0f} MiB" if row["peak_memory_bytes"] else "-"
            best = "-" if row.get("best_epoch") is None else f"{row['best_epoch']:.1f}"
            cost = f"{row['seconds_per_epoch']:.1f} | {best} / {row['epochs']:.1f} | {row['parameters']:,} | {memory}"
            lines.append(f"| {row['model']} | {len(row['seeds'])} | " + " | ".join(cells) + f" | {cost} |")
        if table["comparisons"]:
            lines += ["", f"Against `{table['baseline']}` (paired over users, each user's metric averaged over the "
                          "shared seeds; p-values Holm-adjusted within this table):", ""]
            lines += _comparison_lines(table["comparisons"])
        if table.get("against_best_other"):
            lines += ["", f"The models in focus against the strongest of the others, `{table['best_other']}` (highest "
                          "mean NDCG@10 here; paired as above, Holm-adjusted within this comparison):", ""]
            lines += _comparison_lines(table["against_best_other"])
        lines += ["", "The other history rule (the user's history items left out of the ranking):", ""]
        lines += _small_table(table["rows"], "metrics_excluded")
        if table.get("longest"):
            sub = table["longest"]
            lines += ["", f"The quarter of users with the longest histories ({sub['users']:,} of {sub['of']:,} users, "
                          f"at least {sub['min_history']} items before the test item), RecBole's rule:", ""]
            lines += _small_table(table["rows"], "metrics_longest")
            if table.get("comparisons_longest"):
                lines += ["", f"Against `{table['baseline']}` on this quarter alone (paired as above, Holm-adjusted "
                              "within this comparison):", ""]
                lines += _comparison_lines(table["comparisons_longest"])
        lines.append("")
    if report.get("not_run"):
        lines += ["## Not run", ""] + [f"- {', '.join(n['models'])} on {', '.join(n['datasets'])}: {n['reason']}"
                                       for n in report["not_run"]] + [""]
    if report["missing"]:
        commands = report.get("missing_commands", {})
        lines += [f"## Not finished yet ({len(report['missing'])} cells)", "",
                  f"`mlsa4rec study run {report['file']}` trains them; each alone:", ""]
        lines += [f"- {cell}: `{commands[cell]}`" if commands.get(cell) else f"- {cell}" for cell in report["missing"]]
        lines.append("")
    if report["cells"]:
        lines += ["## Cells", "", "Each cell's run directory, the commit that trained it, and the command that trains "
                  "it alone (the study trains it with the same settings):", ""]
        for c in report["cells"]:
            command = f": `{c['command']}`" if c.get("command") else ""
            lines.append(f"- {c['cell']} (`{c['run']}`, {c['code']}){command}")
        lines.append("")
    return "\n".join(lines)


def _commits(record: dict[str, Any]) -> list[str]:
    """The commits whose code trained a cell, in order: one per session of a paused and resumed run
    (records made before sessions were recorded name the last)."""
    found = [s.get("git_commit") for s in record.get("segments") or []] or [record.get("git_commit")]
    return [c for c in dict.fromkeys(found) if c]


def _code(record: dict[str, Any]) -> str:
    """The code that trained a cell, for the report: its commit, or where a resumed run's code changed,
    each commit with the epoch (and step) its session began at."""
    sessions = list(record.get("segments") or [])
    if sessions and (sessions[0].get("from_epoch"), sessions[0].get("from_step")) != (1, 0):
        sessions.insert(0, {"git_commit": None, "from_epoch": 1, "from_step": 0})  # paused before sessions were kept
    segments = [s for i, s in enumerate(sessions) if i == 0 or s.get("git_commit") != sessions[i - 1].get("git_commit")]
    if len(segments) <= 1:
        return record.get("git_commit") or "commit unknown"
    return ", ".join(f"{s.get('git_commit') or 'commit unknown'} from epoch {s['from_epoch']}"
                     + (f" step {s['from_step']}" if s.get("from_step") else "") for s in segments)


def _machine(m: dict[str, Any]) -> str:
    """``AMD EPYC (cpu, 2 threads)`` from a record's machine."""
    threads = m.get("threads")
    where = ", ".join(x for x in (m.get("device"), threads and f"{threads} thread{'s' if threads != 1 else ''}") if x)
    return f"{m.get('cpu') or 'unknown CPU'}" + (f" ({where})" if where else "")


def _claim_lines(claim: dict[str, Any]) -> list[str]:
    """The claim section: the claim, each model's sentence, and the table behind them."""
    spans = ", ".join(f"{metric} {lo:+.1f}% to {hi:+.1f}%" for metric, (lo, hi) in claim["percent"].items())
    models = ", ".join(f"`{m}`" for m in claim["models"])
    lines = ["## The claim", "", f"Claimed by {claim['source']}: against `{claim['baseline']}`, {spans}, on "
             f"{', '.join(claim['datasets'])}. Tested here for {models}.", "",
             f"Verdicts: *reproduced* is a gain at least the claim's low end with Holm-adjusted p < {claim['alpha']} "
             "(paired over users, Holm over every test of this section); *partly* a significant gain, smaller than "
             "claimed; otherwise *not reproduced*, saying why. A model is reproduced overall where every claimed "
             "metric on every dataset is, partly where any is reproduced or partly.", ""]
    lines += [f"- {s['sentence']}" for s in claim["summary"]] + [""]
    if claim["rows"]:
        lines += ["| model | dataset | seeds | metric | claimed | baseline | this model | measured | 95% CI | "
                  "p (Holm) | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in claim["rows"]:
            lo, hi = r["claimed_percent"]
            ci = "undefined" if r["ci_low"] is None else f"[{r['ci_low']:+.1%}, {r['ci_high']:+.1%}]"
            lines.append(f"| {r['model']} | {r['dataset']} | {len(r['seeds'])} | {r['metric']} | {lo:+.1f}% to "
                         f"{hi:+.1f}% | {r['baseline']:.4f} | {r['candidate']:.4f} | {_relative(r)} | {ci} | "
                         f"{r['p_holm']:.2g} | {r['verdict']} |")
        lines.append("")
    return lines


def _comparison_lines(comparisons: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | metric | baseline | this model | relative | 95% CI | p | p (Holm) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        rel = "undefined" if c["relative"] is None else f"{c['relative']:+.1%}"
        ci = "undefined" if c["ci_low"] is None else f"[{c['ci_low']:+.1%}, {c['ci_high']:+.1%}]"
        lines.append(f"| {c['model']} | {c['metric']} | {c['baseline']:.4f} | {c['candidate']:.4f} | {rel} | "
                     f"{ci} | {c['p_value']:.2g} | {c['p_holm']:.2g} |")
    return lines


def _small_table(rows: list[dict[str, Any]], key: str) -> list[str]:
    """Markdown lines: HR, NDCG and MRR @10 of each row's ``key`` metrics, mean ± std over seeds."""
    keys = [f"{m}@10" for m in METRICS]
    lines = ["| model | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{mean:.4f} ± {'-' if std is None else f'{std:.4f}'}" for mean, std in (row[key][k] for k in keys)]
        lines.append(f"| {row['model']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def write_report(root: str | Path, out_dir: str | Path | None = None, baseline: str | None = None,
                 plots: bool = True) -> list[Path]:
    """``report.json``, ``report.md`` and (``plots``) the figures in ``out_dir`` (default: the study
    directory's ``report/``); returns the files written."""
    out = Path(out_dir) if out_dir is not None else Path(root) / "report"
    if out.exists() and not out.is_dir():
        raise MLSA4RecError(f"--out {str(out)!r} is a file; the report is a directory (report.md, report.json, "
                            "figures): name a directory")
    report = build_report(root, baseline)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", format_markdown(report))
    written = [out / "report.json", out / "report.md"]
    if plots and report["cells"]:
        written += _figures(report, out)
    return written


def _figures(report: dict[str, Any], out: Path) -> list[Path]:
    from mlsa4rec.experiments import plots

    written = []
    for metric in ("ndcg@10", "hit@10"):
        written += plots.plot_bars(report["cells"], metric, out / f"bars-{metric.replace('@', '')}")
    if len({c["max_seq_length"] for c in report["cells"]}) > 1:
        series = [{**c, "model": c["length_series"]} for c in report["cells"]]
        written += plots.plot_vs_length(series, "ndcg@10", out / "ndcg10-vs-length")
        written += plots.plot_cost_vs_length(series, out / "cost-vs-length")[0]
    return written

