"""Seconds per training epoch of model configurations on a real dataset, at several lengths L.

Where a whole epoch would take too long to wait for (the faithful MLSA4Rec on ML-1M reads every
prefix padded to L), the epoch time is projected: ``--steps`` batches drawn at random from a
real shuffled epoch (so short and long batches in their true proportion) are run once untimed
(compilation, and the allocator's first touch of each batch shape, which a whole epoch pays only
once) and then timed; their mean times the number of batches in the epoch is the estimate. ``--full`` also
times whole epochs where the projection is under ``--full-limit`` seconds, to check it.

Peak memory is the process's peak resident set (``runtime.peak_rss_bytes``, Linux) while the
case trains (its timed steps, and its whole epoch with ``--full``), during one step on the epoch's
widest batch (its longest windows: the worst step, which random steps may miss) and while it
validates, reset before each: with ``rss_before_bytes``, what the process held before the case began. Memory a
previous case freed may stay with the allocator, so for memory against L give ``--isolate``: each
case then runs in a process of its own.

    python benchmarks/epoch_time.py --data-dir ../shared/data --dataset ml-1m --lengths 50 200
    python benchmarks/epoch_time.py --dataset amazon-beauty --lengths 50 --full \
        --cases faithful=mlsa4rec:configs/mlsa4rec-beauty.yaml causal=mlsa4rec:configs/mlsa4rec-causal-beauty.yaml

``--study STUDY.yaml`` times the study's own cells on ``--dataset`` instead (one per model and group,
its first seed, the settings exactly as ``mlsa4rec study run`` trains them, L from the cell): what a
compute plan of that study needs.

    python benchmarks/epoch_time.py --study studies/reproduction.yaml --dataset amazon-video-games --full
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import command, load_or_exit, machine, write_json
from mlsa4rec.config import build_config, parse_set
from mlsa4rec.models import build_model, get_class
from mlsa4rec.runtime import peak_rss_bytes, reset_peak_rss
from mlsa4rec.training.trainer import Trainer

# label: (model, settings); batch sizes are chosen to fit in memory at L=200 - the time per
# sample hardly depends on them, the number of optimiser steps per epoch does
CASES = {
    "mlsa4rec faithful": ("mlsa4rec", {"variant": "faithful", "train_batch_size": 256}),
    "mlsa4rec masked": ("mlsa4rec", {"variant": "masked", "train_batch_size": 256}),
    "mlsa4rec causal": ("mlsa4rec", {"variant": "causal", "train_batch_size": 32}),
    "mamba4rec": ("mamba4rec", {"train_batch_size": 32}),
    "sasrec": ("sasrec", {"train_batch_size": 32}),
}


def parse_case(text: str) -> tuple[str, tuple[str, dict, list[str]]]:
    """``LABEL=MODEL[:CONFIG.yaml][:key=value,...]``, e.g. ``causal=mlsa4rec:configs/mlsa4rec-causal-beauty.yaml``."""
    label, _, spec = text.partition("=")
    parts = spec.split(":")
    files = [p for p in parts[1:] if p.endswith((".yaml", ".yml"))]
    sets = [kv for p in parts[1:] if not p.endswith((".yaml", ".yml")) for kv in p.split(",") if kv]
    return label, (parts[0], parse_set(sets), files)


def time_epoch(model_name: str, settings: dict, data, max_len: int, steps: int, full_limit: float,
               files: list[str] = ()) -> dict:
    config = build_config(model_name, files, overrides={**settings, "MAX_ITEM_LIST_LENGTH": max_len, "seed": 0})
    return time_config(model_name, config, data, steps, full_limit)


def study_cases(path: str, dataset: str) -> list[tuple[str, str, object]]:
    """(label, model, config) of each model and group of the study on ``dataset``, at its first seed."""
    from mlsa4rec.errors import MLSA4RecError
    from mlsa4rec.experiments.study import cell_config, dataset_name, load_study

    try:
        study = load_study(path)
    except MLSA4RecError as exc:
        raise SystemExit(f"error: {exc}") from None
    seen, cases = set(), []
    for cell in study.cells:
        key = (cell.group, cell.entry.label)
        if dataset_name(cell.dataset) == dataset_name(dataset) and key not in seen:
            seen.add(key)
            label = cell.entry.label if cell.group == "main" else f"{cell.entry.label}/{cell.group}"
            cases.append((label, cell.entry.model, cell_config(cell, study)))
    if not cases:
        raise SystemExit(f"error: {path} has no cell on {dataset!r}; choose one of its datasets with --dataset")
    return cases


def time_config(model_name: str, config, data, steps: int, full_limit: float) -> dict:
    """One case: ``steps`` random batches timed (and a whole epoch where projected under ``full_limit``),
    then one validation pass."""
    max_len = config.train.max_seq_length
    torch.manual_seed(0)
    model = build_model(get_class(model_name), data.n_items, config.model_kwargs(), max_len)
    trainer = Trainer(model, data, config, torch.device("cpu"))
    batches = trainer.sampler.epoch_batches()
    rng = np.random.default_rng(0)
    picked = rng.choice(len(batches), size=min(steps, len(batches)), replace=False)
    rss_before = peak_rss_bytes() if reset_peak_rss() else None
    for i in picked:  # warm-up on the same batches: compilation, and memory for each batch shape
        trainer.train_step(batches[i], 1)
    times = []
    for i in picked:
        t0 = time.perf_counter()
        trainer.train_step(batches[i], 1)
        times.append(time.perf_counter() - t0)
    projected = float(np.mean(times)) * len(batches)
    out = {"scheme": trainer.scheme, "samples": trainer.sampler.n_samples, "steps_per_epoch": len(batches),
           "batch": config["train_batch_size"], "timed_steps": len(times), "projected_s_per_epoch": round(projected, 1)}
    if projected <= full_limit:
        t0 = time.perf_counter()
        for rows in batches:
            trainer.train_step(rows, 1)
        out["measured_s_per_epoch"] = round(time.perf_counter() - t0, 1)
    out["rss_before_bytes"], out["peak_train_rss_bytes"] = rss_before, peak_rss_bytes()
    # the step of the widest batch (the longest windows), which random steps may miss: memory against L
    widest = max(batches, key=lambda rows: (int(trainer.sampler.sample_lengths[rows].max()), len(rows)))
    reset = reset_peak_rss()
    trainer.train_step(widest, 1)
    out["widest_batch"] = [len(widest), int(trainer.sampler.sample_lengths[widest].max())]
    out["peak_widest_step_rss_bytes"] = peak_rss_bytes() if reset else None
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    trainer.evaluate("valid")
    out["valid_seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_valid_rss_bytes"] = peak_rss_bytes() if reset else None
    return out


def run_isolated(index: int) -> dict:
    """Case ``index`` of this command line in a child process (same arguments), its result row."""
    argv, skip = [], False
    for arg in sys.argv[1:]:  # the child writes its own JSON; --isolate would recurse
        if skip or arg == "--isolate":
            skip = False
            continue
        if arg == "--json":
            skip = True
            continue
        if not arg.startswith("--json="):
            argv.append(arg)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        done = subprocess.run([sys.executable, __file__, *argv, "--job", str(index), "--json", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0 or not out.is_file():
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SystemExit(f"error: case {index} failed in its process: {last}")
        (row,) = json.loads(out.read_text())["results"]
    return {k: v for k, v in row.items() if k not in ("case", "L")}


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--cases", nargs="+", default=list(CASES),
                        help=f"built-in cases ({', '.join(CASES)}) or LABEL=MODEL[:CONFIG.yaml][:key=value,...]")
    parser.add_argument("--steps", type=int, default=20, help="random batches timed per case")
    parser.add_argument("--full", action="store_true", help="also time whole epochs under --full-limit")
    parser.add_argument("--full-limit", type=float, default=300.0)
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--study", help="time this study file's cells on --dataset (instead of --cases, --lengths)")
    parser.add_argument("--isolate", action="store_true",
                        help="each case in a process of its own, so that its peak memory is its own alone")
    parser.add_argument("--job", type=int, help=argparse.SUPPRESS)  # a child of --isolate: run this case only
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    full_limit = args.full_limit if args.full else -1
    data = load_or_exit(args.dataset, args.data_dir)
    results = []
    print(f"{args.dataset}: {data.n_users} users, {data.n_items} items; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'case':<20} {'L':>4} {'scheme':<14} {'steps':>6} {'batch':>6} {'projected s/epoch':>18} "
          f"{'measured':>9} {'valid s':>8} {'peak MiB':>9}")
    jobs = []  # (label, L, thunk)
    if args.study:
        for label, name, config in study_cases(args.study, args.dataset):
            jobs.append((label, config.train.max_seq_length,
                         lambda name=name, config=config: time_config(name, config, data, args.steps, full_limit)))
    else:
        for length in args.lengths:
            for case in args.cases:
                label, (name, settings, files) = (case, (*CASES[case], [])) if case in CASES else parse_case(case)
                jobs.append((label, length, lambda name=name, settings=settings, files=files, length=length:
                             time_epoch(name, settings, data, length, args.steps, full_limit, files)))
    if args.job is not None:
        jobs = [jobs[args.job]]
    for index, (label, length, job) in enumerate(jobs):
        r = run_isolated(index) if args.isolate and args.job is None else job()
        results.append({"case": label, "L": length, **r})
        print(f"{label:<20} {length:>4} {r['scheme']:<14} {r['steps_per_epoch']:>6} {r['batch']:>6} "
              f"{r['projected_s_per_epoch']:>18.1f} {r.get('measured_s_per_epoch', float('nan')):>9.1f} "
              f"{r['valid_seconds']:>8.1f} {_mib(r['peak_train_rss_bytes']):>9}", flush=True)
    if args.json:
        threads = torch.get_num_threads()
        write_json(args.json, {"dataset": args.dataset, "threads": threads, "command": command(__file__),
                               "machine": machine(threads=threads), "results": results})


if __name__ == "__main__":
    main()
