"""What one new event costs: a streaming step against re-encoding the whole history.

A Mamba model (and a GRU) carries a constant-size state per user, so adding one event to a
session is one ``step``, whatever came before; a model without a state re-encodes the history.
For histories of n = 50 ... 4000 events this times, per model, (a) ``Session.add`` + scoring
(the serving path: one step and the scores over every item) against (b) re-encoding the n
events and scoring, as a stateless service must. Both run on one history (batch 1), on CPU,
each the median of ``--repeats`` timed calls after a warm-up.

    python benchmarks/streaming.py --run-dir runs/mamba4rec-beauty --run-dir runs/mlsa4rec-causal-beauty
    python benchmarks/streaming.py            # untrained Beauty-sized models (timing does not depend on weights)

Writes ``docs/results/streaming.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from mlsa4rec.config import build_config
from mlsa4rec.data.itemmap import ItemMap
from mlsa4rec.models import create
from mlsa4rec.runtime import cpu_model
from mlsa4rec.serving import Recommender

LENGTHS = (50, 200, 1000, 4000)
DEFAULT_MODELS = {"mamba4rec": {}, "mlsa4rec causal": {"variant": "causal"}, "gru4rec": {}}
N_ITEMS = 12101  # Amazon Beauty


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: kernels compiled, buffers allocated
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def untrained(name: str, overrides: dict) -> Recommender:
    model_name = name.split()[0]
    torch.manual_seed(0)
    model = create(model_name, N_ITEMS, **overrides)
    config = build_config(model_name, overrides=overrides, extra={"dataset": "untrained"})
    items = ItemMap(list(range(1, N_ITEMS + 1)), torch.ones(N_ITEMS, dtype=torch.int64).numpy())
    return Recommender(model, config, items, torch.device("cpu"))


def add_one(session, state, representation) -> None:
    """One event on top of the saved state, and the scores after it (the serving path)."""
    session.state, session.representation = state, representation
    session.add_ids([7])
    session.scores()


@torch.inference_mode()
def measure(rec: Recommender, lengths: tuple[int, ...], repeats: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        history = torch.randint(1, rec.items.n_items + 1, (1, n), generator=g)
        session = rec.session()
        session.add_ids(history[0].tolist())  # the state after n events
        step_s = median_seconds(functools.partial(add_one, session, session.state, session.representation), repeats)
        encode_s = median_seconds(functools.partial(rec.model.full_sort_scores, history, torch.tensor([n])),
                                  max(3, repeats // 10))
        rows.append({"events": n, "step_ms": step_s * 1e3, "re_encode_ms": encode_s * 1e3,
                     "ratio": encode_s / step_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", action="append", default=[], help="a finished run of a streaming model")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="docs/results/streaming.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.run_dir:
        recs = {Path(d).name: Recommender.from_run(d, device="cpu") for d in args.run_dir}
    else:
        recs = {name: untrained(name, over) for name, over in DEFAULT_MODELS.items()}
    results = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__, "repeats": args.repeats,
               "models": {}}
    print("| model | events | add one event + score (ms) | re-encode + score (ms) | re-encode / add |")
    print("|---|---:|---:|---:|---:|")
    for name, rec in recs.items():
        rows = measure(rec, tuple(args.lengths), args.repeats)
        results["models"][name] = {"model": rec.config["model"], "variant": rec.config.to_dict().get("variant"),
                                   "parameters": rec.model.num_parameters(), "items": rec.items.n_items,
                                   "rows": rows}
        for r in rows:
            print(f"| {name} | {r['events']:,} | {r['step_ms']:.2f} | {r['re_encode_ms']:.1f} | {r['ratio']:.0f}x |")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
