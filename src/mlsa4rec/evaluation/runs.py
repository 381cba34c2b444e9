"""Finished runs loaded back: rebuilt, re-evaluated on valid and test, compared user by user.

A run directory (written by ``training/run.py`` through ``training/rundir.py``) is checked against
its manifest, its data against the fingerprint the run recorded, and its model rebuilt from
``config.yaml`` exactly as training built it (``build_run_model``, the one place both use).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from mlsa4rec.config import Config, build_config, load_yaml_file
from mlsa4rec.data import REGISTRY, SequenceData, data_dir_from, duplicates_mismatch, load_dataset, resolve
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation.evaluator import evaluate_split, split_ranks
from mlsa4rec.evaluation.significance import check_confidence, compare_ranks, holm
from mlsa4rec.metrics import parse_metric
from mlsa4rec.models import build_model, get_class
from mlsa4rec.ops.scan import check_environment
from mlsa4rec.training import rundir
from mlsa4rec.training.distributed import resolve_device
from mlsa4rec.training.trainer import set_seed

log = logging.getLogger("mlsa4rec")


def build_run_model(config: Config, data: SequenceData, device: torch.device | str | None = None):
    """The run's model, seeded; on the ``meta`` device it costs nothing (for size estimates)."""
    set_seed(config["seed"])
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return build_model(get_class(config["model"]), data.n_items, config.model_kwargs(),
                           config["MAX_ITEM_LIST_LENGTH"])


def load_run_data(config: Config, data_dir: str | Path | None) -> SequenceData:
    return load_dataset(config["dataset"], data_dir, config["user_inter_num_interval"],
                        config["item_inter_num_interval"], duplicate_events=config["duplicate_events"])


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise MLSA4RecError(f"weights file {str(path)!r} is missing; is this a finished run directory?")
    try:
        state = safetensors.torch.load_file(str(path))
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise MLSA4RecError(f"weights file {str(path)!r} is corrupt or not safetensors ({exc}); retrain or "
                            "restore the file") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MLSA4RecError(f"weights in {str(path)!r} do not fit the model in config.yaml: {first}") from None


@dataclass
class LoadedRun:
    """A finished run directory rebuilt: its config, its data and its model with the saved weights."""

    path: Path
    config: Config
    data: SequenceData
    model: torch.nn.Module
    device: torch.device


def load_run(run_dir: str | Path, data_dir: str | Path | None = None) -> LoadedRun:
    """Rebuild a run directory's data and model (weights loaded, on the run's device, in eval mode),
    after checking its files against its manifest and refusing data that differs from what the
    run was trained on."""
    check_environment()
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        rundir.warn_replaced_leftovers(run)  # an interrupted --overwrite may have left the old run hidden
        raise MLSA4RecError(f"{str(run)!r} is not a run directory (no config.yaml); pass the --output-dir of a "
                            "finished `mlsa4rec train`")
    rundir.verify_run(run)
    saved = load_yaml_file(run / "config.yaml")
    if "model" not in saved or "dataset" not in saved:
        raise MLSA4RecError(f"{str(run / 'config.yaml')!r} lacks the model or dataset entry")
    get_class(str(saved["model"]))
    config = build_config(saved["model"], [run / "config.yaml"], extra={"dataset": saved["dataset"]})
    device = run_device(config, run)
    try:
        recorded = json.loads((run / "results.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    if data_dir_from(data_dir) is None and recorded.get("data_dir"):
        data_dir = recorded["data_dir"]  # where the run found its data
    data = load_run_data(config, data_dir)
    if why := duplicates_mismatch(data, recorded.get("data_fingerprint"), f"run {str(run)!r}"):
        raise MLSA4RecError(why)
    if recorded.get("data_fingerprint") not in (None, data.fingerprint):
        raise MLSA4RecError(data_mismatch_message(config, data, data_dir, recorded))
    net = build_run_model(config, data)
    load_weights(net, run / rundir.WEIGHTS)
    net.to(device).eval()
    return LoadedRun(run, config, data, net, device)


def data_mismatch_message(config: Config, data: SequenceData, data_dir: str | Path | None,
                          recorded: Mapping[str, Any]) -> str:
    """Why the data found for a run is not the data it was trained on, and what to do. Runs since
    0.2 record the data file's SHA-256 (``data_sha256`` in results.json); older ones record only
    a fingerprint of file and filtering together, so the two causes cannot be told apart."""
    dataset = config["dataset"]
    where = ("point --data-dir at the original files" if dataset in REGISTRY
             else f"restore the original file at {dataset!r}")
    path, digest = resolve(dataset, data_dir)[1], data.file_sha256  # the load's own checksum: no second read
    trained_on = recorded.get("data_sha256")
    if not isinstance(trained_on, str):
        return (f"the data found for {dataset!r} ({str(path)!r}) differs from the data this run was trained on "
                "(its file or filtering differ; the run's results.json predates data_sha256, so it records no "
                f"checksum of the file itself); {where}")
    if digest != trained_on:
        return (f"the data file {str(path)!r} differs from the data this run was trained on: its SHA-256 is "
                f"{digest[:16]}..., results.json records data_sha256 {trained_on[:16]}...; {where} (any file with "
                "that SHA-256 will do)")
    versions = recorded.get("versions")
    version = versions.get("mlsa4rec") if isinstance(versions, dict) else None
    return (f"the data file {str(path)!r} is the one this run was trained on (same SHA-256), but it is now "
            "processed differently (this mlsa4rec version's reader or filtering changed); evaluate the run with "
            f"the mlsa4rec version that trained it ({version or 'see results.json'})")


def run_device(config: Config, run: Path) -> torch.device:
    """Where a finished run is scored: the device it trained with, or, on a machine without that
    device (a run trained on a GPU, scored on a laptop), the best one here, with a warning."""
    try:
        return resolve_device(config["device"])
    except MLSA4RecError:
        device = resolve_device("auto")
        log.warning("%s was trained with device=%s, which this machine does not have; it is scored on %s", run,
                    config["device"], device)
        return device


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
    config: Mapping[str, Any] = run.config
    if exclude_history is not None:
        config = {**run.config.to_dict(), "exclude_history": exclude_history}
    return {"model": run.config["model"], "dataset": run.config["dataset"],
            "exclude_history": config["exclude_history"],
            **{split: evaluate_split(run.model, run.data, split, config, run.device)
               for split in ("valid", "test")}}


def run_ranks(run: LoadedRun, split: str = "test", exclude_history: bool | None = None) -> np.ndarray:
    """The target rank of every user of ``split``, in user order, exactly as the run's evaluation
    ranks them (same L, padding, batch size and history rule, unless ``exclude_history`` is given)."""
    c = run.config
    exclude = c["exclude_history"] if exclude_history is None else exclude_history
    return split_ranks(run.model, run.data, split, c["MAX_ITEM_LIST_LENGTH"], c["eval_batch_size"], exclude,
                       run.device)


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
        ranks.append(run_ranks(run, split, exclude))
        run.model.cpu()  # free an accelerator for the next run
        runs.append(run)
    rows = holm([compare_ranks(ranks[0], r, m, confidence, n_resamples, seed) for r in ranks[1:] for m in metrics])
    describe = [{"run": str(r.path), "model": r.config["model"], "variant": r.config.to_dict().get("variant")}
                for r in runs]
    return {"dataset": runs[0].config["dataset"], "split": split, "users": len(ranks[0]), "exclude_history": exclude,
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
