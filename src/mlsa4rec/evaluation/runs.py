"""Finished runs re-evaluated on valid and test, and compared user by user.

Runs are loaded by ``runs.loading.load_run`` (files checked against the manifest, the data against
the fingerprint the run recorded, the model rebuilt exactly as training built it, the data split as
the run's settings say).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mlsa4rec.config import load_yaml_file
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation.evaluator import evaluate_split, split_ranks
from mlsa4rec.evaluation.significance import check_confidence, compare_ranks, holm
from mlsa4rec.metrics import parse_metric
from mlsa4rec.runs.loading import LoadedRun, load_run

log = logging.getLogger("mlsa4rec")


def evaluate_run(run_dir: str | Path, data_dir: str | Path | None = None,
                 exclude_history: bool | None = None) -> dict[str, Any]:
    """Re-evaluate a run directory's saved weights on valid and test.

    ``exclude_history`` overrides the run's rule for the user's own history items: published
    tables differ (RecBole's sequential models rank them; HSTU's public experiments and SASRec's
    authors leave them out), and on long histories the rule alone moves HR@10 by a third.
    """
    return evaluate_loaded(load_run(run_dir, data_dir), exclude_history)


def evaluate_loaded(run: LoadedRun, exclude_history: bool | None = None) -> dict[str, Any]:
    """``evaluate_run`` on a run already loaded, so one load can be scored under both rules."""
    settings = run.config.train
    if exclude_history is not None:
        settings = run.config.with_train(exclude_history=exclude_history).train
    return {"model": run.config.model, "dataset": run.config.dataset, "exclude_history": settings.exclude_history,
            **{split: evaluate_split(run.model, run.data, split, settings, run.device)
               for split in ("valid", "test")}}


def run_ranks(run: LoadedRun, split: str = "test", exclude_history: bool | None = None) -> np.ndarray:
    """The target rank of every user of ``split``, in user order, exactly as the run's evaluation
    ranks them (same L, padding, batch size and history rule, unless ``exclude_history`` is given)."""
    t = run.config.train
    exclude = t.exclude_history if exclude_history is None else exclude_history
    return split_ranks(run.model, run.data, split, t.max_seq_length, t.eval_batch_size, exclude, run.device,
                       item_chunk=t.eval_item_chunk)


def compare_runs(run_dirs: list[str | Path], split: str = "test",
                 metrics: tuple[str, ...] = ("hit@10", "ndcg@10", "mrr@10"), data_dir: str | Path | None = None,
                 confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0,
                 exclude_history: bool | None = None) -> dict[str, Any]:
    """Every run after the first against the first (the baseline), paired over the users of ``split``:
    relative difference, bootstrap interval, t-test p-value, Holm-adjusted over all rows.

    All runs are scored under one history rule: ``exclude_history``, or else the rule they share;
    runs trained under different rules are refused rather than compared across rules.
    """
    if len(run_dirs) < 2:
        raise MLSA4RecError("compare needs a baseline run directory and at least one more")
    for metric in metrics:  # bad settings fail before minutes of scoring, not after
        parse_metric(metric)
    check_confidence(confidence)
    # the rule is read from each config.yaml before any data or weights are loaded (a missing file
    # is refused by load_run below, with its own message, so exclude stays None only on that path)
    configs = [Path(path) / "config.yaml" for path in run_dirs]
    rules = {bool(load_yaml_file(c).get("exclude_history", False)) for c in configs if c.is_file()}
    if exclude_history is None and len(rules) > 1:
        raise MLSA4RecError("the runs were evaluated under different history rules (exclude_history differs); "
                            "pass --history ranked or --history excluded to score them all under one")
    exclude = exclude_history if exclude_history is not None else rules.pop() if rules else None
    runs, ranks = [], []
    for path in run_dirs:
        run = load_run(path, data_dir)
        if runs and run.data.fingerprint != runs[0].data.fingerprint:
            raise MLSA4RecError(f"{str(path)!r} was trained on other data than {str(runs[0].path)!r} (dataset, file "
                                "or filtering differ); a paired comparison needs the same users")
        if runs and run.data.split != runs[0].data.split:
            raise MLSA4RecError(f"{str(path)!r} was split otherwise than {str(runs[0].path)!r} "
                                f"({run.data.split.describe()} vs {runs[0].data.split.describe()}); a paired "
                                "comparison needs the same users and targets")
        ranks.append(run_ranks(run, split, exclude))
        run.model.cpu()  # free an accelerator for the next run
        runs.append(run)
    rows = holm([compare_ranks(ranks[0], r, m, confidence, n_resamples, seed) for r in ranks[1:] for m in metrics])
    describe = [{"run": str(r.path), "model": r.config.model, "variant": getattr(r.config.hyper, "variant", None)}
                for r in runs]
    return {"dataset": runs[0].config.dataset, "split": split, "users": len(ranks[0]), "exclude_history": exclude,
            "baseline": describe[0],
            "comparisons": [{**describe[1 + i // len(metrics)], **row.to_dict()} for i, row in enumerate(rows)]}


def format_comparison(result: dict[str, Any]) -> str:
    """``compare_runs``' result as an aligned text table."""
    def label(r: dict[str, Any]) -> str:
        return r["run"] + f" ({r['model']}{', ' + r['variant'] if r['variant'] else ''})"

    base = result["baseline"]
    ci_head = f"{result['comparisons'][0]['confidence']:.0%} CI"
    lines = [f"{result['split']} split of {result['dataset']}, {result['users']:,} users; baseline: {label(base)}",
             f"{'metric':<9} {'baseline':>9} {'run':>9} {'rel. diff':>9}  {ci_head:<18} "
             f"{'p (t-test)':>10} {'p (Holm)':>9}"]
    current = None
    for row in result["comparisons"]:
        if row["run"] != current:
            current = row["run"]
            lines.append(label(row))
        # a baseline of 0 leaves the relative difference (and so its interval) undefined
        relative = "undefined" if row["relative"] is None else f"{row['relative']:+.1%}"
        ci = "undefined" if row["ci_low"] is None else f"[{row['ci_low']:+.1%}, {row['ci_high']:+.1%}]"
        lines.append(f"{row['metric']:<9} {row['baseline']:>9.4f} {row['candidate']:>9.4f} {relative:>9}  "
                     f"{ci:<18} {row['p_value']:>10.2g} {row['p_holm']:>9.2g}")
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    """Valid and test metrics as an aligned text table."""
    keys = list(results["test"])
    width = max(len(k) for k in keys) + 2
    lines = ["split".ljust(8) + "".join(k.rjust(width) for k in keys)]
    for split in ("valid", "test"):
        lines.append(split.ljust(8) + "".join(f"{results[split][k]:.4f}".rjust(width) for k in keys))
    return "\n".join(lines)
