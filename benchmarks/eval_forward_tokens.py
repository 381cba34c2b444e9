"""Seconds of one validation pass against the positions each forward call of evaluation holds.

Evaluation scores users ``eval_batch_size`` (1,024) at a time; on a CPU the model's forward on such
a batch of long histories leaves the caches, so ``evaluation.evaluator`` runs it on pieces of at
most ``CPU_FORWARD_TOKENS`` positions (padding-invariant models). This script times ``split_ranks``
on a real validation split with several bounds (0: the whole batch in one call, as before; the
bound is forced, also for the faithful MLSA4Rec that evaluation leaves whole) and refuses to go on
unless every bound gives the same rank for every user. The models are freshly initialised: the
time does not depend on the weights. Each case runs ``--repeats`` times after one untimed pass;
the median is reported.

    python benchmarks/eval_forward_tokens.py --data-dir ../shared/data --json docs/results/eval_forward_tokens.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import command, machine, table, write_json
from mlsa4rec.config import build_config
from mlsa4rec.errors import DataError
from mlsa4rec.evaluation.evaluator import split_ranks
from mlsa4rec.runs.loading import build_run_model, load_run_data

# label: (model, dataset, config files, settings): the study's cells whose validation costs most
CASES = {
    "mlsa4rec-causal ml-1m L200": ("mlsa4rec", "ml-1m", ["mlsa4rec-causal", "configs/all-positions-ml-1m.yaml"],
                                   {"MAX_ITEM_LIST_LENGTH": 200}),
    "mamba4rec ml-1m L200": ("mamba4rec", "ml-1m", ["mamba4rec-ml-1m", "configs/all-positions-ml-1m.yaml"],
                             {"MAX_ITEM_LIST_LENGTH": 200}),
    "sasrec ml-1m L200": ("sasrec", "ml-1m", ["sasrec-ml-1m", "configs/all-positions-ml-1m.yaml"],
                          {"MAX_ITEM_LIST_LENGTH": 200}),
    "mlsa4rec-causal ml-1m L50": ("mlsa4rec", "ml-1m", ["mlsa4rec-causal", "configs/all-positions-ml-1m.yaml"], {}),
    "mamba4rec ml-1m L50": ("mamba4rec", "ml-1m", ["mamba4rec-ml-1m", "configs/all-positions-ml-1m.yaml"],
                            {"MAX_ITEM_LIST_LENGTH": 50}),
    "mlsa4rec-masked beauty L50": ("mlsa4rec", "amazon-beauty", ["configs/mlsa4rec-beauty.yaml"],
                                   {"variant": "masked"}),
    "mlsa4rec-faithful beauty L50": ("mlsa4rec", "amazon-beauty", ["configs/mlsa4rec-beauty.yaml"], {}),
}


def time_case(label: str, data_dir: str | None, bounds: list[int], repeats: int) -> dict:
    """One case: the median seconds of a validation pass at each bound, the ranks checked equal."""
    model, dataset, files, settings = CASES[label]
    config = build_config(model, files, settings, extra={"dataset": dataset})
    try:
        data = load_run_data(config, data_dir)
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from None
    net = build_run_model(config, data.n_items).eval()
    t = config.train
    row = {"case": label, "users": int(len(data.eval_targets("valid"))), "L": t.max_seq_length,
           "eval_batch_size": t.eval_batch_size, "seconds": {}}
    reference = None
    for tokens in bounds:
        def run() -> np.ndarray:
            return split_ranks(net, data, "valid", t.max_seq_length, t.eval_batch_size, t.exclude_history,
                               tokens_per_call=tokens)  # noqa: B023 (called before the loop moves on)

        ranks = run()  # untimed: the allocator's first touch of each shape
        if reference is None:
            reference = ranks
        elif not np.array_equal(ranks, reference):
            raise SystemExit(f"error: {label}: the ranks with {tokens} positions a call differ from those with "
                             f"{bounds[0]}; the pieces must give the same numbers")
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        row["seconds"][str(tokens)] = round(float(np.median(times)), 3)
        print(f"{label}: {tokens or 'the whole batch'} positions a call: {row['seconds'][str(tokens)]} s", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES), metavar="CASE")
    parser.add_argument("--tokens", nargs="*", type=int, default=[0, 32768, 16384, 8192],
                        help="bounds on the positions of one forward call (0: the whole batch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [time_case(label, args.data_dir, args.tokens, args.repeats) for label in args.cases]
    heads = ["case", "users", "L", *[f"{k or 'whole batch'}: s" for k in args.tokens], "speed-up at 16384"]
    rows = [[r["case"], r["users"], r["L"], *[r["seconds"][str(k)] for k in args.tokens],
             f"{r['seconds']['0'] / r['seconds']['16384']:.2f}x" if {"0", "16384"} <= set(r["seconds"]) else "-"]
            for r in results]
    print(table(heads, rows))
    if args.json:
        write_json(args.json, {"command": command(__file__, argv), "machine": machine(threads=args.threads),
                               "repeats": args.repeats, "results": results})


if __name__ == "__main__":
    main()
