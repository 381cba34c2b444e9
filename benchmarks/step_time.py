"""Training-step time of the linear-cost models beside SASRec and Mamba4Rec, at L = 50, 200, 1000.

One step is what the trainer does per batch: the loss of ``training.trainer.cross_entropy`` (the
fused full-softmax CE on CPU), its backward and an Adam update. Every model gets the same batch:
``--batch`` full windows of L items over a Beauty-sized catalogue (12,101 items), each model's
default hyperparameters, dropout on. The loss is taken the way the model trains: at every
position for the causal models (all-positions scheme), at the masked positions for BERT4Rec
(cloze: each item masked with probability 0.2, at most int(0.2 L) targets per window). Each
figure is the median of ``--repeats`` timed steps after ``--warmup`` untimed ones.

    python benchmarks/step_time.py --out docs/results/step_time

Writes OUT.json and OUT.md (the Markdown table, also printed). Compare the models as ratios to
SASRec within one run: machines of one kind differ, and other work may share the cores.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import torch

from common import command, machine, median_ms, repeat_timed, table, write_report
from mlsa4rec.data.sampling import Batch, cloze_masks
from mlsa4rec.models import create
from mlsa4rec.training.losses import full_softmax_cross_entropy
from mlsa4rec.training.trainer import cross_entropy

LENGTHS = (50, 200, 1000)
LOSS_LABEL = "(the CE loss alone)"
N_ITEMS = 12101  # Amazon Beauty after the 5-core filter
# label: (model, settings)
MODELS = {
    "SASRec": ("sasrec", {}),
    "Mamba4Rec": ("mamba4rec", {}),
    "MLSA4Rec causal": ("mlsa4rec", {"variant": "causal"}),
    "BERT4Rec": ("bert4rec", {}),
    "LinRec": ("linrec", {}),
    "Performer": ("performer", {}),
    "LRURec": ("lrurec", {}),
    "GRU4Rec": ("gru4rec", {}),
}


def make_batch(model: torch.nn.Module, batch: int, length: int, rng: np.random.Generator) -> tuple[Batch, str]:
    """A batch of full windows with the targets of the model's training scheme."""
    seq = rng.integers(1, N_ITEMS + 1, size=(batch, length))
    lengths = np.full(batch, length)
    if model.cloze:
        masked, is_target = cloze_masks(lengths, length, np.zeros(batch, dtype=bool), rng.random((batch, length)),
                                        model.mask_ratio, int(model.mask_ratio * length))
        targets, seq = np.where(is_target, seq, 0), np.where(masked, model.mask_token, seq)
        scheme = "cloze"
    else:
        targets, scheme = rng.integers(1, N_ITEMS + 1, size=(batch, length)), "all_positions"
    return Batch(torch.from_numpy(seq), torch.from_numpy(lengths), torch.from_numpy(targets),
                 np.arange(batch)), scheme


def time_steps(name: str, settings: dict, batch: int, length: int, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = create(name, N_ITEMS, MAX_ITEM_LIST_LENGTH=length, **settings).train()
    data, scheme = make_batch(model, batch, length, np.random.default_rng(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    device = torch.device("cpu")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        cross_entropy(model, data, scheme, device).backward()
        optimizer.step()

    times = repeat_timed(step, repeats, warmup)
    return {"model": name, "settings": settings, "L": length, "scheme": scheme,
            "targets": int((data.targets > 0).sum()), "ms": median_ms(times),
            "ms_all": [round(1000 * s, 2) for s in times], "parameters": model.num_parameters()}


def time_loss(batch: int, length: int, warmup: int, repeats: int, hidden: int = 64) -> dict:
    """The part of every causal model's step that does not depend on the model: the full-softmax CE
    of B x L targets against the item table, forward and backward."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(batch * length, hidden, generator=g) * 0.1).requires_grad_()
    items = (torch.randn(N_ITEMS, hidden, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, N_ITEMS, (batch * length,), generator=g)
    times = repeat_timed(lambda: full_softmax_cross_entropy(h, items, targets).backward(), repeats, warmup)
    return {"model": "loss", "settings": {}, "L": length, "scheme": "all_positions", "targets": batch * length,
            "ms": median_ms(times), "ms_all": [round(1000 * s, 2) for s in times], "parameters": 0}


def markdown(report: dict[str, Any]) -> str:
    """The table: each model's milliseconds per step at each L, and as a multiple of SASRec's."""
    lengths = report["lengths"]
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for r in report["results"]:
        rows.setdefault(r["label"], {})[r["L"]] = r
    base = rows.get("SASRec", {})
    body = []
    for label, by_len in rows.items():
        cells = []
        for n in lengths:
            r = by_len.get(n)
            ratio = f" ({r['ms'] / base[n]['ms']:.2f}x)" if r and n in base else ""
            cells.append(f"{r['ms']:.1f}{ratio}" if r else "-")
        params = next(iter(by_len.values()))["parameters"]
        body.append([label, f"{params:,}" if params else "-", *cells])
    return table(["model", "parameters", *(f"L={n} ms (x SASRec)" for n in lengths)], body) + "\n"


def page(report: dict[str, Any]) -> str:
    """OUT.md, generated from OUT.json."""
    m = report["machine"]
    return (f"# Training-step time (issue 15)\n\nOne optimiser step on {report['batch']} full windows of L items, "
            f"{report['n_items']:,} items, dropout on; median of {report['repeats']} steps after {report['warmup']} "
            f"untimed. CPU: {m['cpu']}, {m['threads']} threads, torch {report['torch']}.\n\n"
            f"```bash\n{report['command']}\n```\n\n" + markdown(report))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--batch", type=int, default=16, help="windows per step (default 16)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="LABEL")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for n in args.lengths:
        for label in args.models:
            name, settings = MODELS[label]
            r = {"label": label, **time_steps(name, settings, args.batch, n, args.warmup, args.repeats)}
            print(f"L={n:5d} {label:16s} {r['ms']:9.1f} ms/step ({r['targets']} targets)", file=sys.stderr)
            results.append(r)
        r = {"label": LOSS_LABEL, **time_loss(args.batch, n, args.warmup, args.repeats)}
        print(f"L={n:5d} {LOSS_LABEL:16s} {r['ms']:9.1f} ms/step", file=sys.stderr)
        results.append(r)
    report = {"benchmark": "step_time", "command": command(__file__),
              "machine": machine(threads=torch.get_num_threads()), "torch": torch.__version__,
              "batch": args.batch, "n_items": N_ITEMS, "lengths": args.lengths, "warmup": args.warmup,
              "repeats": args.repeats, "results": results}
    print(markdown(report))
    if args.out:
        write_report(args.out, report, page(report))


if __name__ == "__main__":
    main()
