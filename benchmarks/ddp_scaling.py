"""Seconds per training epoch with 1, 2, ... processes (torchrun, gloo on CPU) on this machine.

    python benchmarks/ddp_scaling.py --data-dir ../shared/data          # ML-1M, the `make main` config
    python benchmarks/ddp_scaling.py --dataset FILE --nproc 1 2 --set hidden_size=16   # any data file

Each setting runs ``mlsa4rec train --nproc N`` for ``--epochs`` epochs (default 1) into a temporary
directory and reads results.json: training seconds per epoch (the number compared), validation
seconds, and the whole command's wall-clock (start-up, data loading and the final evaluation
included). The cores are shared out: each of N ranks gets OMP_NUM_THREADS = cores // N, so every
row uses the whole machine. ``train_batch_size`` is the global batch whatever N (the ranks split
each batch), so every row does the same optimisation work; on a machine whose cores one process
already keeps busy, expect little gain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(nproc: int, args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / f"run-{nproc}"
    threads = max(1, (os.cpu_count() or 1) // nproc)
    command = [sys.executable, "-m", "mlsa4rec", "-q", "train", "--model", args.model, "--dataset", args.dataset,
               "--output-dir", str(out), "--nproc", str(nproc), "--set", f"epochs={args.epochs}"]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    for file in args.config:
        command += ["--config", file]
    for item in args.set:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"nproc={nproc} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    return {"nproc": nproc, "threads_per_rank": threads, "seconds_per_epoch": results["seconds_per_epoch"],
            "eval_seconds_per_epoch": results["eval_seconds"] / max(results["epochs_run"], 1),
            "wall_seconds": round(wall, 1), "valid": results["valid"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-1m", help="registered dataset or data file (default ml-1m)")
    parser.add_argument("--data-dir", help="folder laid out like shared/data (needed for registered datasets)")
    parser.add_argument("--model", default="sasrec")
    parser.add_argument("--config", action="append", default=None, metavar="FILE",
                        help="settings file(s); default configs/sasrec-ml-1m-quick.yaml for ml-1m")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    if args.config is None:
        args.config = [str(REPO / "configs" / "sasrec-ml-1m-quick.yaml")] if args.dataset == "ml-1m" else []
    if not Path(args.dataset).is_file():
        sys.path.insert(0, str(REPO / "src"))
        from mlsa4rec.data import REGISTRY

        spec = REGISTRY.get(args.dataset)
        if spec is None:
            sys.exit(f"unknown dataset {args.dataset!r}: pass a registered name or a data file")
        if not args.data_dir or not (Path(args.data_dir) / spec.local_path).is_file():
            print(f"skipped: {args.dataset} not found in --data-dir {args.data_dir!r} (expected "
                  f"{spec.local_path} there); this benchmark does not download data")
            return
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as tmp:
        for n in args.nproc:
            rows.append(run_one(n, args, Path(tmp)))
            print(f"nproc={n}: {rows[-1]['seconds_per_epoch']:.2f} s/epoch", file=sys.stderr, flush=True)
    base = rows[0]["seconds_per_epoch"]
    key = "ndcg@10" if "ndcg@10" in rows[0]["valid"] else next(iter(rows[0]["valid"]))
    print(f"{args.model} on {args.dataset}, {args.epochs} epoch(s), {os.cpu_count()} cores, configs "
          f"{[Path(c).name for c in args.config]} {args.set}")
    print(f"{'nproc':>5} {'threads/rank':>12} {'train s/epoch':>13} {'speed-up':>8} {'valid s':>8} "
          f"{'wall s':>7} {'valid ' + key:>14}")
    for r in rows:
        print(f"{r['nproc']:>5} {r['threads_per_rank']:>12} {r['seconds_per_epoch']:>13.2f} "
              f"{base / r['seconds_per_epoch']:>8.2f} {r['eval_seconds_per_epoch']:>8.2f} {r['wall_seconds']:>7.1f} "
              f"{r['valid'][key]:>14.4f}")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
