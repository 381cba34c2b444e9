"""The causal LSA's chunked context against its definition, alone and inside a training step.

Issue 26 asks that the cells dominating the reproduction study's compute cost at least 1.5x less,
computing the same thing. The causal MLSA4Rec on ML-1M is one: profiled, its LSA was 40 % (L=50)
to 46 % (L=200) of a training step, most of it materialising every position's running poolings
(B x L x P x D twice). ``layers.lsa.causal_context`` regroups the same sums so that they are never
materialised (tests/layers/test_lsa.py pins outputs, gradients and the dropout mask to
``causal_context_reference``). This script times both, interleaved in one process so that the
ratio is fair on a shared machine:

* ``lsa``: the LSA's context, forward and backward, on B x L x D inputs (D=64, 8 heads, 20 interests);
* ``step``: one optimiser step of the causal MLSA4Rec (its defaults, dropout on) on B full
  windows of L items, the loss at every position (the all-positions scheme), the CE fused as in
  training; ``--items`` sets the catalogue (3,416: ML-1M, 12,101: Amazon Beauty).

    python benchmarks/causal_lsa.py --out docs/results/causal_lsa

Writes OUT.json and OUT.md (also printed). Each figure is the median of ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import torch

from common import command, machine, median_ms, repeat_timed, table, write_report
from mlsa4rec.data.sampling import Batch
from mlsa4rec.layers import lsa as lsa_module
from mlsa4rec.layers.lsa import LowRankSelfAttention
from mlsa4rec.models import create
from mlsa4rec.training.trainer import cross_entropy

IMPLEMENTATIONS = {"reference": lsa_module.causal_context_reference, "chunked": lsa_module.causal_context}


def using(name: str):
    """Route the causal LSA through implementation ``name`` (the model calls ``causal_context``)."""
    lsa_module.causal_context = IMPLEMENTATIONS[name]


def lsa_timer(batch: int, length: int):
    torch.manual_seed(0)
    layer = LowRankSelfAttention(64, 8, 20, 0.1, 0.1, variant="causal", softmax="interests").train()
    x = torch.randn(batch, length, 64, requires_grad=True)
    return lambda: layer.context(x).sum().backward()


def step_timer(batch: int, length: int, n_items: int):
    torch.manual_seed(0)
    model = create("mlsa4rec", n_items, MAX_ITEM_LIST_LENGTH=length, variant="causal").train()
    rng = np.random.default_rng(0)
    data = Batch(torch.from_numpy(rng.integers(1, n_items + 1, size=(batch, length))), torch.full((batch,), length),
                 torch.from_numpy(rng.integers(1, n_items + 1, size=(batch, length))), np.arange(batch))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    device = torch.device("cpu")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        cross_entropy(model, data, "all_positions", device).backward()
        optimizer.step()
    return step


def measure(kind: str, batch: int, length: int, n_items: int, warmup: int, repeats: int, rounds: int) -> dict:
    """Both implementations, ``rounds`` times each, alternating; the best round's median of each."""
    ms: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(rounds):
        for name in IMPLEMENTATIONS:
            using(name)
            fn = lsa_timer(batch, length) if kind == "lsa" else step_timer(batch, length, n_items)
            ms[name].append(median_ms(repeat_timed(fn, repeats, warmup)))
    using("chunked")
    best = {name: min(values) for name, values in ms.items()}
    return {"kind": kind, "batch": batch, "L": length, "items": n_items if kind == "step" else None,
            "reference_ms": round(best["reference"], 1), "chunked_ms": round(best["chunked"], 1),
            "speedup": round(best["reference"] / best["chunked"], 2), "rounds_ms": ms}


def page(report: dict[str, Any]) -> str:
    m = report["machine"]
    rows = [[r["kind"], r["batch"], r["L"], f"{r['items']:,}" if r["items"] else "-", r["reference_ms"],
             r["chunked_ms"], f"{r['speedup']:.2f}x"] for r in report["results"]]
    return (f"# The causal LSA: chunked context against its definition (issue 26)\n\n"
            f"Median of {report['repeats']} calls after {report['warmup']} untimed, best of {report['rounds']} "
            f"alternating rounds. CPU: {m['cpu']}, {m['threads']} torch threads, torch {report['torch']}. "
            f"{report['note']}\n\n```bash\n{report['command']}\n```\n\n"
            + table(["what", "B", "L", "items", "reference ms", "chunked ms", "speed-up"], rows, align="lrrrrrr")
            + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    p.add_argument("--batch", type=int, default=32, help="windows per step (default 32, the ML-1M recipes')")
    p.add_argument("--items", type=int, nargs="+", default=[3416], help="catalogue sizes of the step (ML-1M: 3416)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--note", default="", help="a sentence for the page (e.g. what else ran on the machine)")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for length in args.lengths:
        cases = [("lsa", None), *(("step", n) for n in args.items)]
        for kind, n_items in cases:
            r = measure(kind, args.batch, length, n_items or 0, args.warmup, args.repeats, args.rounds)
            print(f"{kind:4s} B={args.batch} L={length:4d} items={n_items or '-'}: reference {r['reference_ms']:8.1f} "
                  f"ms, chunked {r['chunked_ms']:8.1f} ms, {r['speedup']:.2f}x", file=sys.stderr)
            results.append(r)
    report = {"command": command("causal_lsa.py"), "machine": machine(torch.get_num_threads()),
              "torch": torch.__version__, "batch": args.batch, "warmup": args.warmup, "repeats": args.repeats,
              "rounds": args.rounds, "note": args.note, "results": results}
    text = page(report)
    print(text)
    if args.out:
        write_report(args.out, report, text)


if __name__ == "__main__":
    main()
