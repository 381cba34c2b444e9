"""One training step of a large catalogue under torchrun: where the time and memory of a rank go.

    python benchmarks/ddp_step.py                                   # 10^6 items, 1,024 sampled negatives, 1 and 2 ranks
    python benchmarks/ddp_step.py --items 1e4 --loss CE --nproc 1 2 --json
    python benchmarks/ddp_step.py --exchange dense rows --nproc 2     # the item table summed whole, then by rows

Each setting starts ``torchrun --standalone --nproc_per_node N`` on this script. Every rank builds the
same SASRec (same seed), takes its strided shard of one fixed global batch (B = 256 rows of L + 1
random items, all positions), and runs the trainer's own pieces: ``cross_entropy`` with the run's
``TrainingLoss`` (negatives drawn from (seed, step), so the same on every rank), ``backward``, the
group's ``sum_gradients`` (the item table's gradient summed by the rows some rank touched, the
default ``--exchange rows``; ``dense`` sums it whole, as before that), and an Adam step. Dropout
is off, so 1 and N ranks follow the same trajectory up to float rounding (the loss after the last
step is printed to show it). The first step (allocations, Adam's state) is not timed; the median
of the rest is. Peak memory is each rank's resident maximum (``ru_maxrss``).

The cores are shared out like ``benchmarks/ddp_scaling.py``: each of N ranks gets cores // N threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from common import run_as_rank, torchrun_self

REPO = Path(__file__).resolve().parents[1]


def child(params: dict[str, Any]) -> None:
    """One rank: the timed steps; rank 0 writes every rank's numbers to ``params['out']``."""
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from mlsa4rec.config import build_config
    from mlsa4rec.data.sampling import Batch
    from mlsa4rec.models.registry import create
    from mlsa4rec.training import distributed, trainer
    from mlsa4rec.training.losses import TrainingLoss

    if params["exchange"] == "dense":
        distributed.ROW_SPARSE_MIN_ROWS = 2 ** 62  # no parameter is that tall: every gradient is summed whole
    group, device = distributed.init("cpu", 600)
    n_items, length, batch = params["items"], params["length"], params["batch"]
    settings = {"MAX_ITEM_LIST_LENGTH": length, "loss_type": params["loss"], "negatives": params["negatives"],
                "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0}
    config = build_config("sasrec", overrides=settings)
    torch.manual_seed(0)
    model = create("sasrec", n_items, **{k: v for k, v in settings.items() if k in ("MAX_ITEM_LIST_LENGTH",
                                                                                    "hidden_dropout_prob",
                                                                                    "attn_dropout_prob")})
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, n_items + 1, (batch, length + 1), generator=g)
    rows = distributed.shard_rows(torch.arange(batch).numpy(), group.rank, group.world_size)
    shard = Batch(seq[rows, :-1], torch.full((len(rows),), length), seq[rows, 1:], None)
    t = config.train
    criterion = None if str(t.loss_type).upper() == "CE" else TrainingLoss(
        t.loss_type, n_items, negatives=t.negatives, sampler=t.negative_sampler,
        logq_correction=t.logq_correction, gbce_t=t.gbce_t, seed=0)
    phases: dict[str, list[float]] = {"compute": [], "communicate": [], "update": []}
    loss_value = float("nan")
    for step in range(params["steps"] + 1):
        group.barrier()  # every rank starts the step together, so a rank's wait is the others' work
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        extra = {} if criterion is None else {"loss": criterion, "step": step}
        loss = trainer.cross_entropy(model, shard, "all_positions", device, **extra)
        if group.active:
            loss = loss * (len(rows) / batch)  # every row has L targets: the shares add up to the batch's mean
        loss.backward()
        t1 = time.perf_counter()
        loss_value = group.sum_gradients(model.parameters(), loss)
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        if step:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[name].append(seconds)
    mine = {name: sorted(v)[len(v) // 2] for name, v in phases.items()}
    mine["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
    views = [json.loads(b) for b in group.all_gather_bytes(json.dumps(mine).encode())] if group.active else [mine]
    if group.is_main:
        table = model.item_table()
        Path(params["out"]).write_text(json.dumps({
            "ranks": views, "loss_after": loss_value, "steps_timed": params["steps"],
            "table_mib": table.numel() * table.element_size() / 2 ** 20,
            "gradient_mib": sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20}))
    group.barrier()  # leave together: a rank that tears gloo down while rank 0 still writes can abort it
    distributed.destroy(group)


def run_one(nproc: int, exchange: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    threads = max(1, (os.cpu_count() or 1) // nproc) if args.threads is None else args.threads
    params = {"items": int(float(args.items)), "length": args.length, "batch": args.batch, "loss": args.loss,
              "negatives": args.negatives, "steps": args.steps, "out": str(out), "exchange": exchange}
    row = torchrun_self(__file__, nproc, params, threads, args.timeout, f"nproc={nproc}",
                        env={"PYTHONPATH": str(REPO / "src")})
    ranks = row.pop("ranks")
    step = {name: ranks[0][name] for name in ("compute", "communicate", "update")}
    return {"nproc": nproc, "exchange": exchange if nproc > 1 else "-", "threads_per_rank": threads, **step,
            "step": sum(step.values()),
            "peak_gib_per_rank": max(r["peak_gib"] for r in ranks), **row}


def main() -> None:
    run_as_rank(child)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="1e6", help="catalogue size (default 1e6)")
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256, help="the global batch (the ranks split it)")
    parser.add_argument("--loss", default="sampled_softmax", help="loss_type (default sampled_softmax)")
    parser.add_argument("--negatives", type=int, default=1024)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--exchange", nargs="+", choices=["rows", "dense"], default=["rows"],
                        help="how ranks sum the item table's gradient (several: one row each, for N > 1)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after one untimed)")
    parser.add_argument("--threads", type=int, help="threads per rank (default cores // nproc)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per setting")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="ddp-step-") as tmp:
        for n in args.nproc:
            for exchange in args.exchange if n > 1 else ["rows"]:
                rows.append(run_one(n, exchange, args, Path(tmp) / f"rank0-{n}-{exchange}.json"))
                print(f"nproc={n} {rows[-1]['exchange']}: {rows[-1]['step']:.3f} s/step", file=sys.stderr, flush=True)
    first = rows[0]
    print(f"SASRec, {int(float(args.items)):,} items, B = {args.batch}, L = {args.length}, {args.loss}"
          f"{'' if args.loss.upper() == 'CE' else f' ({args.negatives} negatives)'}; item table "
          f"{first['table_mib']:.0f} MiB, all gradients {first['gradient_mib']:.0f} MiB; {os.cpu_count()} cores")
    print(f"{'nproc':>5} {'exchange':>8} {'threads':>7} {'compute s':>9} {'all-reduce s':>12} {'Adam s':>7} "
          f"{'step s':>7} "
          f"{'speed-up':>8} {'peak GiB/rank':>13} {'loss after':>10}")
    for r in rows:
        print(f"{r['nproc']:>5} {r['exchange']:>8} {r['threads_per_rank']:>7} {r['compute']:>9.3f} "
              f"{r['communicate']:>12.3f} "
              f"{r['update']:>7.3f} {r['step']:>7.3f} {first['step'] / r['step']:>8.2f} "
              f"{r['peak_gib_per_rank']:>13.2f} {r['loss_after']:>10.5f}")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
