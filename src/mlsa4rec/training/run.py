"""Training runs end to end, and finished runs loaded back: train, evaluate, compare.

A run directory holds ``config.yaml``, ``results.json``, ``model.safetensors``, ``items.json``,
``train.log`` and ``manifest.json`` (the SHA-256 of each); ``rundir`` builds it in a hidden staging directory,
publishes it when the run has finished and decides what may ever be deleted. While a run trains,
the staging directory also holds ``checkpoint.pt`` (every epoch, and every ``checkpoint_steps``
steps); a run that dies after its first checkpoint leaves it there, and ``train ... --resume``
continues from it. A run that fails before then leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

import mlsa4rec
from mlsa4rec.config import Config, build_config, load_yaml_file
from mlsa4rec.data import REGISTRY, SequenceData, data_dir_from, load_dataset
from mlsa4rec.data.itemmap import ItemMap
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation import evaluate_split, split_ranks
from mlsa4rec.evaluation.significance import check_confidence, compare_ranks, holm
from mlsa4rec.metrics import parse_metric
from mlsa4rec.models import build_model, get_class
from mlsa4rec.ops.scan import check_environment
from mlsa4rec.training import checkpoint, distributed, rundir
from mlsa4rec.training.distributed import DistContext
from mlsa4rec.training.trainer import NonFiniteLoss, Trainer, set_seed

log = logging.getLogger("mlsa4rec")



def git_commit() -> str | None:
    """The commit of the source tree this package runs from, with '+dirty' if it has changes."""
    here = Path(mlsa4rec.__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    return {"mlsa4rec": mlsa4rec.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__}


def build_run_model(config: Config, data: SequenceData, device: torch.device | str | None = None):
    """The run's model, seeded; on the ``meta`` device it costs nothing (for size estimates)."""
    set_seed(config["seed"])
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return build_model(get_class(config["model"]), data.n_items, config.model_kwargs(),
                           config["MAX_ITEM_LIST_LENGTH"])


def load_run_data(config: Config, data_dir: str | Path | None) -> SequenceData:
    return load_dataset(config["dataset"], data_dir, config["user_inter_num_interval"],
                        config["item_inter_num_interval"])


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(config: Config, data: SequenceData, device: torch.device) -> None:
    """Refuse a run that cannot fit before anything large is allocated.

    The estimate is a floor, never an overestimate: parameters with their gradient and Adam's two
    moments (the model is built on the ``meta`` device, so this costs nothing), plus the larger of
    one training batch (its item ids, one hidden-state tensor and the score rows the loss holds at
    once: a chunk of 256 targets in the fused CPU loss, every target elsewhere) and one evaluation
    batch's full-ranking scores.
    """
    try:
        net = build_run_model(config, data, device="meta")
    except RuntimeError as exc:  # sizes whose byte count overflows 64 bits
        raise MLSA4RecError(f"this run's model is larger than any amount of memory ({str(exc).splitlines()[0]}); "
                            "lower hidden_size, MAX_ITEM_LIST_LENGTH or train_batch_size") from None
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    scheme = config["train_scheme"] if config["train_scheme"] != "auto" else net.preferred_scheme
    length = config["MAX_ITEM_LIST_LENGTH"]
    width = min(length, data.stats()["max_length"]) if net.padding_invariant else length
    batch = config["train_batch_size"]
    targets = batch * width if scheme == "all_positions" else batch
    score_rows = min(targets, 256) if device.type == "cpu" else targets
    hidden = int(config.get("hidden_size", 64))
    columns = data.n_items + 1
    step_bytes = max(batch * width * (8 + 4 * hidden) + score_rows * columns * 4,
                     config["eval_batch_size"] * columns * 4)
    need = 4 * param_bytes + step_bytes
    free = available_memory(device)
    if free is not None and need > free:
        raise MLSA4RecError(
            f"this run needs at least {_gib(need)} of memory on {device} (parameters, gradients and Adam state "
            f"{_gib(4 * param_bytes)}, one batch {_gib(step_bytes)}) but {_gib(free)} is available; lower "
            "hidden_size, MAX_ITEM_LIST_LENGTH, train_batch_size or eval_batch_size")


_OOM_MARKS = ("can't allocate memory", "not enough memory", "out of memory")


def as_user_error(exc: BaseException) -> BaseException:
    """Running out of memory or disk is a limit of the machine, not a bug: say so in one line."""
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                        and any(m in str(exc).lower() for m in _OOM_MARKS)):
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return MLSA4RecError(f"ran out of memory ({first}); lower train_batch_size, eval_batch_size, hidden_size "
                             "or MAX_ITEM_LIST_LENGTH")
    return exc


def preflight(model: str, dataset: str, output_dir: str | Path, config_files: list[str | Path] = (),
              overrides: dict[str, Any] | None = None, data_dir: str | Path | None = None, overwrite: bool = False,
              resume: bool = False, world_size: int = 1) -> None:
    """Every check ``train`` makes before it starts, without writing anything but the dataset
    cache: lets ``--nproc`` report bad input as one clear error before it launches processes."""
    check_environment()
    get_class(model)
    dataset = _resolve_dataset(dataset)
    config = build_config(model, config_files, overrides, extra={"dataset": str(dataset)})
    name = config["device"]
    device = distributed.device_for(name, 0) if world_size > 1 else distributed.resolve_device(name)
    out = rundir.resolve_output_dir(output_dir, overwrite=overwrite)
    _, _, payload = rundir.open_stage(out, overwrite=overwrite, resume=resume, dry=True)
    data = load_run_data(config, data_dir)
    check_memory(config, data, device)
    if payload:
        state = checkpoint.decode_training_state(payload)
        checkpoint.check_resumable(state, config.to_dict(), data.fingerprint, world_size,
                                   str(rundir.staging_dir(out) / "config.yaml"))


def _resolve_dataset(dataset: str) -> str:
    if dataset not in REGISTRY and Path(dataset).is_file():
        return str(Path(dataset).resolve())  # so that `evaluate` works from any directory
    return dataset


def train(
    model: str,
    dataset: str,
    output_dir: str | Path,
    config_files: list[str | Path] = (),
    overrides: dict[str, Any] | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``dataset``, evaluate the best epoch on valid and test, save the run.

    Under torchrun every rank calls this; rank 0 alone writes files. ``resume`` continues the
    interrupted run of ``output_dir`` from its checkpoint. ``on_step(epoch, step)`` is called
    after every optimiser step (progress reporting, tests). ``results["run_dir"]`` is where the
    run was saved (``output_dir`` resolved; see ``rundir.publish`` for the one exception).
    """
    check_environment()
    get_class(model)  # unknown model: fail before anything else
    dataset = _resolve_dataset(dataset)
    config = build_config(model, config_files, overrides, extra={"dataset": str(dataset)})
    group, device = distributed.init(config["device"], config["dist_timeout"])
    old_level = log.level
    if not group.is_main:
        log.setLevel(logging.WARNING)  # the other ranks only warn; rank 0 tells the story
    elif log.getEffectiveLevel() > logging.INFO:  # library use without logging set up: still fill train.log
        log.setLevel(logging.INFO)
    try:
        results = _train(model, output_dir, config, data_dir, overwrite=overwrite, resume=resume, on_step=on_step,
                         group=group, device=device)
        # every rank leaves together (rank 0 may still be publishing): a rank that tears gloo down
        # while its peer is busy was seen to abort at exit ("terminate called ...") on a loaded machine
        group.barrier()
        return results
    finally:
        log.setLevel(old_level)
        distributed.destroy(group)


def _train(model: str, output_dir: str | Path, config: Config, data_dir: str | Path | None, *, overwrite: bool,
           resume: bool, on_step: Callable[[int, int], None] | None, group: DistContext,
           device: torch.device) -> dict[str, Any]:
    """Check, train, evaluate, publish. Rank 0 holds the ``rundir.Stage`` (None on the others)."""
    opened: dict[str, rundir.Stage] = {}

    def open_stage() -> bytes:
        opened["stage"], payload = rundir.Stage.open(output_dir, overwrite=overwrite, resume=resume)
        return payload

    payload = group.run_on_main(open_stage)
    stage = opened.get("stage")
    training = False  # past the resume checks: a failure from here on keeps the checkpoint with a hint
    try:
        t0 = time.perf_counter()
        data = load_run_data(config, data_dir)
        data_seconds = time.perf_counter() - t0
        stats = data.stats()
        state = checkpoint.decode_training_state(payload) if resume else None
        changed = []
        if state is not None:
            where = str(stage.path / "config.yaml") if stage is not None else "the interrupted run's config.yaml"
            changed = checkpoint.check_resumable(state, config.to_dict(), data.fingerprint, group.world_size, where)
        check_memory(config, data, device)
        if stage is not None:
            stage.begin()
        log.info("dataset %s: %d users, %d items, %d interactions (%.2f s)", stats["dataset"], stats["users"],
                 stats["items"], stats["interactions"], data_seconds)
        if state is not None:
            log.info("resuming the interrupted run in %s%s", stage.path if stage is not None else "its stage",
                     f" with changed settings: {'; '.join(changed)}" if changed else "")
        if stage is not None:
            stage.write_setup(config.to_dict(), ItemMap.from_data(data).to_json())
        net = build_run_model(config, data)

        def save_best(m: torch.nn.Module, epoch: int) -> None:
            stage.save_weights(safetensors.torch.save(
                {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()},
                metadata={"model": model, "epoch": str(epoch)}))

        # given on every rank (gathering the ranks' random states is collective); called on rank 0
        trainer = Trainer(net, data, config, device, on_improve=save_best, group=group,
                          on_checkpoint=lambda training_state: stage.save_checkpoint(training_state),
                          on_step=on_step)
        if state is not None:
            checkpoint.load_training_state(trainer, state)
            del state, payload
        training = True
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        commit = git_commit()  # the code that trains, not whatever HEAD is when the run ends
        fit = trainer.fit()
        valid, test = trainer.evaluate("valid"), trainer.evaluate("test")
        results = {
            "model": model,
            "dataset": stats,
            "data_fingerprint": data.fingerprint,
            "data_dir": str(Path(d).resolve()) if (d := data_dir_from(data_dir)) else None,
            "data_source": data.source,
            "train_scheme": trainer.scheme,
            "valid": valid,
            "test": test,
            "best_epoch": fit.best_epoch,
            "epochs_run": fit.epochs_run,
            "stopped_early": fit.stopped_early,
            "seconds_per_epoch": round(fit.seconds_per_epoch, 3),
            "train_seconds": round(fit.train_seconds, 3),
            "eval_seconds": round(fit.eval_seconds, 3),
            "data_seconds": round(data_seconds, 3),
            "parameters": net.num_parameters(),
            "parameters_non_embedding": net.num_parameters(exclude_embeddings=True),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "world_size": group.world_size,
            "resumed": bool(resume),
            "started": started,
            "versions": versions(),
            "git_commit": commit,
            "history": fit.history,
        }
        if stage is not None:
            stage.write_results(results)
    except BaseException as exc:
        exc = as_user_error(exc)
        if stage is not None and stage.fail() and training:
            _add_resume_hint(exc, stage.path)
        raise exc from None
    finally:
        if stage is not None:
            stage.close_log()
    if stage is None:
        return results
    results["run_dir"] = str(stage.publish())
    return results


def _add_resume_hint(exc: BaseException, stage: Path) -> None:
    """A run that failed while training kept its checkpoint: say how to go on (the resume checks
    failing leaves the interrupted run as it was, with no hint)."""
    if isinstance(exc, NonFiniteLoss):
        hint = (f"the last good checkpoint is kept in {str(stage)!r}; resuming unchanged would diverge again: rerun "
                "with --resume --set clip_grad_norm=1.0 to continue with gradient clipping, or with --overwrite "
                "and a lower learning_rate to start over")
    else:
        hint = (f"the last checkpoint is kept in {str(stage)!r}: rerun the same command with --resume to continue "
                "from it, or with --overwrite to start over")
    if isinstance(exc, MLSA4RecError):
        exc.args = (f"{exc}; {hint}",)
    else:
        log.warning("%s", hint)


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
        raise MLSA4RecError(f"{str(run)!r} is not a run directory (no config.yaml); pass the --output-dir of a "
                            "finished `mlsa4rec train`")
    rundir.verify_run(run)
    saved = load_yaml_file(run / "config.yaml")
    if "model" not in saved or "dataset" not in saved:
        raise MLSA4RecError(f"{str(run / 'config.yaml')!r} lacks the model or dataset entry")
    get_class(str(saved["model"]))
    config = build_config(saved["model"], [run / "config.yaml"], extra={"dataset": saved["dataset"]})
    try:
        recorded = json.loads((run / "results.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    if data_dir_from(data_dir) is None and recorded.get("data_dir"):
        data_dir = recorded["data_dir"]  # where the run found its data
    data = load_run_data(config, data_dir)
    if recorded.get("data_fingerprint") not in (None, data.fingerprint):
        fix = ("restore the original file (its checksum is recorded in results.json)"
               if config["dataset"] not in REGISTRY else "point --data-dir at the original files")
        raise MLSA4RecError(f"the data found for {config['dataset']!r} differs from the data this run was trained "
                            f"on (checksum or filtering differ); {fix}")
    net = build_run_model(config, data)
    load_weights(net, run / rundir.WEIGHTS)
    device = distributed.resolve_device(config["device"])
    net.to(device).eval()
    return LoadedRun(run, config, data, net, device)


def evaluate_run(run_dir: str | Path, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Re-evaluate a run directory's saved weights on valid and test."""
    run = load_run(run_dir, data_dir)
    return {"model": run.config["model"], "dataset": run.config["dataset"],
            **{split: evaluate_split(run.model, run.data, split, run.config, run.device)
               for split in ("valid", "test")}}


def run_ranks(run: LoadedRun, split: str = "test") -> np.ndarray:
    """The target rank of every user of ``split``, in user order, exactly as the run's evaluation
    ranks them (same L, padding, batch size and history rule)."""
    c = run.config
    return split_ranks(run.model, run.data, split, c["MAX_ITEM_LIST_LENGTH"], c["eval_batch_size"],
                       c["exclude_history"], run.device)


def compare_runs(run_dirs: list[str | Path], split: str = "test",
                 metrics: tuple[str, ...] = ("hit@10", "ndcg@10", "mrr@10"), data_dir: str | Path | None = None,
                 confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Every run after the first against the first (the baseline), paired over the users of ``split``:
    relative difference, bootstrap interval, t-test p-value, Holm-adjusted over all rows."""
    if len(run_dirs) < 2:
        raise MLSA4RecError("compare needs a baseline run directory and at least one more")
    for metric in metrics:  # bad settings fail before minutes of scoring, not after
        parse_metric(metric)
    check_confidence(confidence)
    runs, ranks = [], []
    for path in run_dirs:
        run = load_run(path, data_dir)
        if runs and run.data.fingerprint != runs[0].data.fingerprint:
            raise MLSA4RecError(f"{str(path)!r} was trained on other data than {str(runs[0].path)!r} (dataset, file "
                                "or filtering differ); a paired comparison needs the same users")
        ranks.append(run_ranks(run, split))
        run.model.cpu()  # free an accelerator for the next run
        runs.append(run)
    rows = holm([compare_ranks(ranks[0], r, m, confidence, n_resamples, seed) for r in ranks[1:] for m in metrics])
    describe = [{"run": str(r.path), "model": r.config["model"], "variant": r.config.to_dict().get("variant")}
                for r in runs]
    return {"dataset": runs[0].config["dataset"], "split": split, "users": len(ranks[0]), "baseline": describe[0],
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
