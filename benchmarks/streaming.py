"""What one new event costs: a streaming step against re-encoding the whole history.

A Mamba model (and a GRU) carries a constant-size state per user, so adding one event to a
session is one ``step``, whatever came before; a model without a state re-encodes the history.
For histories of n = 50 ... 4000 events this times, per model, on one history (batch 1):

* the event through ``step`` (eager, and compiled by ``Recommender.compile_step``), from the state
  after n events, against re-encoding the n + 1 events with ``forward``, as a stateless service
  must for every event;
* the scores over every item that a recommendation adds, the same for both paths (reported apart).

Each figure is the median of ``--repeats`` timed calls after a warm-up.

    python benchmarks/streaming.py --run-dir runs/mamba4rec-beauty --untrained "mlsa4rec causal" gru4rec

(``--untrained`` builds Beauty-sized models with fresh weights: the time does not depend on them.)
Writes ``docs/results/streaming.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from common import command, machine, repeat_timed, row, table, write_json
from mlsa4rec.config import build_config
from mlsa4rec.data.itemmap import ItemMap
from mlsa4rec.models import create
from mlsa4rec.serving import Recommender

LENGTHS = (50, 200, 1000, 4000)
UNTRAINED = {"mamba4rec": {}, "mlsa4rec causal": {"variant": "causal"}, "gru4rec": {}}
N_ITEMS = 12101  # Amazon Beauty


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median of ``repeats`` calls after one warm-up (kernels compiled, buffers allocated)."""
    return statistics.median(repeat_timed(fn, repeats))


def untrained(name: str, overrides: dict) -> Recommender:
    model_name = name.split()[0]
    torch.manual_seed(0)
    model = create(model_name, N_ITEMS, **overrides)
    config = build_config(model_name, overrides=overrides, extra={"dataset": "untrained"})
    items = ItemMap(list(range(1, N_ITEMS + 1)), torch.ones(N_ITEMS, dtype=torch.int64).numpy())
    return Recommender(model, config, items, torch.device("cpu"))


@torch.inference_mode()
def measure(rec: Recommender, lengths: tuple[int, ...], repeats: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    eager = rec.model.step
    compiled = rec.model.step if not rec.compile_step() else rec._step
    item = torch.tensor([7])
    for n in lengths:
        history = torch.randint(1, rec.items.n_items + 1, (1, n + 1), generator=g)
        session = rec.session()
        session.add_ids(history[0, :n].tolist())  # the state after n events
        state = session.state
        step_s = median_seconds(functools.partial(eager, item, state), repeats)
        compiled_s = median_seconds(functools.partial(compiled, item, state), repeats)
        encode_s = median_seconds(functools.partial(rec.model, history, torch.tensor([n + 1])), max(5, repeats // 10))
        score_s = median_seconds(functools.partial(rec.scores_from_state, session.representation), repeats)
        rows.append({"events": n, "step_ms": step_s * 1e3, "step_compiled_ms": compiled_s * 1e3,
                     "re_encode_ms": encode_s * 1e3, "score_ms": score_s * 1e3, "ratio": encode_s / step_s,
                     "ratio_compiled": encode_s / compiled_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", action="append", default=[], help="a finished run of a streaming model")
    parser.add_argument("--untrained", nargs="*", default=None, choices=list(UNTRAINED),
                        help="Beauty-sized models with fresh weights (default: all, when no --run-dir is given)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one session is serial work)")
    parser.add_argument("--out", default="docs/results/streaming.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recs = {Path(d).name: Recommender.from_run(d, device="cpu") for d in args.run_dir}
    untrained_names = args.untrained if args.untrained is not None else ([] if recs else list(UNTRAINED))
    recs.update({f"{name} (untrained)": untrained(name, UNTRAINED[name]) for name in untrained_names})
    # the machine's fields at the top level, where the first report put cpu, threads and torch
    results = {"command": command(__file__), **machine(threads=args.threads), "repeats": args.repeats, "models": {}}
    print(table(["model", "events", "event by step (ms)", "compiled step (ms)", "re-encode (ms)", "re-encode / step",
                 "re-encode / compiled step", "scores (ms)"], align="lrrrrrrr"))
    for name, rec in recs.items():
        rows = measure(rec, tuple(args.lengths), args.repeats)
        results["models"][name] = {"model": rec.config["model"], "variant": rec.config.to_dict().get("variant"),
                                   "parameters": rec.model.num_parameters(), "items": rec.items.n_items,
                                   "rows": rows}
        for r in rows:
            print(row([name, f"{r['events']:,}", f"{r['step_ms']:.3f}", f"{r['step_compiled_ms']:.3f}",
                       f"{r['re_encode_ms']:.2f}", f"{r['ratio']:.0f}x", f"{r['ratio_compiled']:.0f}x",
                       f"{r['score_ms']:.3f}"]))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
