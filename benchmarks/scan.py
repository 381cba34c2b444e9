"""Time and memory of the selective scan and of whole layers, forward + backward, per length.

    python benchmarks/scan.py [--lengths 50 200 1000] [--repeats 3] [--write]

For B=256, D=64, N=32, E=2 (d_inner=128) and each L, every case runs in a fresh subprocess and
reports the median fwd+bwd time over ``--repeats`` runs after one warm-up, and the extra peak
memory (peak RSS minus RSS once the inputs exist). Cases:

* the scan alone, per implementation: ``cpu`` (compiled), ``torch`` (pure-PyTorch loop),
  ``reference`` (autograd through a loop) and mambapy's parallel ``pscan`` when installed; the
  last two materialise the B x d_inner x N x L state several times and are skipped at L > 200;
* one Mamba4Rec layer (Mamba + LayerNorm + FFN) and a 2-layer SASRec block on a B x L x 64
  input: forward, backward and an Adam step. SASRec is timed with RecBole's attention dropout
  (0.5, explicit attention) and without it (fused SDPA).

``--write`` saves the numbers to docs/results/scan_benchmark.json and the table generated from them
to docs/results/scan_benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import REPO, command, machine, median_ms, repeat_timed, table, write_report

BATCH, D_MODEL, D_STATE, EXPAND = 256, 64, 32, 2
SCANS = ["cpu", "torch", "reference", "mambapy"]
LAYERS = ["mamba4rec_layer", "sasrec_2_layers", "sasrec_2_layers_sdpa"]
MATERIALISING = {"reference", "mambapy"}  # memory ~ 10 x B d N L floats: > 20 GB at L=1000


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _scan_case(impl: str, length: int):
    import torch

    from mlsa4rec.ops import selective_scan

    g = torch.Generator().manual_seed(0)
    d = EXPAND * D_MODEL
    leaves = [torch.randn(BATCH, d, length, generator=g),                  # u
              torch.randn(BATCH, d, length, generator=g) - 2.0,            # delta (softplus ~ 0.13)
              -torch.exp(torch.randn(d, D_STATE, generator=g)),            # A
              torch.randn(BATCH, D_STATE, length, generator=g),            # B
              torch.randn(BATCH, D_STATE, length, generator=g),            # C
              torch.randn(d, generator=g),                                 # D
              torch.randn(BATCH, d, length, generator=g),                  # z
              torch.zeros(d)]                                              # delta_bias
    for x in leaves:
        x.requires_grad_()

    if impl == "mambapy":
        import torch.nn.functional as F
        from mambapy.pscan import pscan

        def step():
            u, delta, A, B, C, D, z, bias = leaves
            dt = F.softplus(delta + bias[:, None]).transpose(1, 2)               # B x L x d
            dA = torch.exp(dt.unsqueeze(-1) * A)                                  # B x L x d x N
            bx = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * u.transpose(1, 2).unsqueeze(-1)
            hs = pscan(dA, bx)
            y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2) + D[:, None] * u
            (y * F.silu(z)).sum().backward()
    else:
        def step():
            selective_scan(*leaves, delta_softplus=True, impl=impl).sum().backward()
    return step


def _layer_case(kind: str, length: int):
    import torch

    from mlsa4rec.layers import TransformerLayer
    from mlsa4rec.models.mamba4rec import MambaLayer

    torch.manual_seed(0)
    if kind == "mamba4rec_layer":
        net = MambaLayer(D_MODEL, D_STATE, 4, EXPAND, dropout=0.2, residual=False)
    else:
        attn_dropout = 0.0 if kind.endswith("sdpa") else 0.5
        net = torch.nn.Sequential(*(TransformerLayer(D_MODEL, 2, 4 * D_MODEL, 0.5, attn_dropout, "gelu", 1e-12)
                                    for _ in range(2)))
    net.train()
    x = torch.randn(BATCH, length, D_MODEL)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        net(x).square().mean().backward()
        opt.step()
    return step


def run_one(case: str, length: int, repeats: int) -> dict:
    """Runs in the child process: build inputs, warm up, time, report peak memory."""
    import torch

    from mlsa4rec.runtime import tune_allocator

    tune_allocator()  # as the CLI does for training
    step = _layer_case(case, length) if case in LAYERS else _scan_case(case, length)
    base = _rss_kb("VmRSS")
    times = repeat_timed(step, repeats)  # after one warm-up (and numba's compile or cache load)
    return {"case": case, "L": length, "ms": round(median_ms(times), 1),
            "extra_peak_mb": round((_rss_kb("VmHWM") - base) / 1024), "threads": torch.get_num_threads()}


def run_in_child(case: str, length: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", case, str(length), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"case": case, "L": length, "ms": None, "extra_peak_mb": None, "note": f"failed: {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=SCANS + LAYERS, choices=SCANS + LAYERS)
    parser.add_argument("--write", action="store_true", help="also write docs/results/scan_benchmark.md")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.repeats)))
        return
    try:
        import mambapy  # noqa: F401
        have_mambapy = True
    except ImportError:
        have_mambapy = False
    rows = []
    for length in args.lengths:
        for case in args.cases:
            if case == "mambapy" and not have_mambapy:
                row = {"case": case, "L": length, "ms": None, "extra_peak_mb": None,
                       "note": "not installed (pip install mambapy)"}
            elif case in MATERIALISING and length > 200:
                row = {"case": case, "L": length, "ms": None, "extra_peak_mb": None,
                       "note": "skipped: materialises the B x d x N x L state (> 20 GB)"}
            else:
                row = run_in_child(case, length, args.repeats)
            rows.append(row)
            shown = f"{row['ms']:>9.1f} ms {row['extra_peak_mb']:>7} MB" if row["ms"] is not None else row["note"]
            print(f"L={length:<5} {case:<22} {shown}", flush=True)
    print()
    print(markdown(rows, args.lengths, args.cases))
    if args.write:
        # the parent imports torch here only: each case measures its own process's memory
        report = {"command": command(__file__), "machine": machine(), "batch": BATCH, "d_model": D_MODEL,
                  "d_state": D_STATE, "expand": EXPAND, "repeats": args.repeats, "lengths": args.lengths,
                  "cases": args.cases, "rows": rows}
        write_report(REPO / "docs" / "results" / "scan_benchmark", report, page(report))


def page(report: dict[str, Any]) -> str:
    """docs/results/scan_benchmark.md, generated from its JSON."""
    m, rows = report["machine"], report["rows"]
    return ("# Selective scan and layer benchmark\n\n"
            f"Generated by `{report['command']}` on a {m['cores']}-core {m['cpu']} machine, torch threads = "
            f"{rows[0].get('threads', '?')}. B={report['batch']}, D={report['d_model']}, N={report['d_state']}, "
            f"E={report['expand']} (d_inner={report['expand'] * report['d_model']}); "
            f"fwd+bwd (layers: + Adam step), median of {report['repeats']} after a warm-up, each case in a fresh "
            "process; MB = extra peak RSS over the inputs (an upper bound: freed memory kept by the allocator "
            "counts).\n\n" + markdown(rows, report["lengths"], report["cases"]) + "\n")


def markdown(rows: list[dict], lengths: list[int], cases: list[str]) -> str:
    """Milliseconds and extra peak MB of each case (rows) at each L (column pairs)."""
    by = {(r["case"], r["L"]): r for r in rows}
    body = []
    for case in cases:
        cells = [case]
        for n in lengths:
            r = by.get((case, n), {})
            cells += [f"{r['ms']:,.0f}", f"{r['extra_peak_mb']:,}"] if r.get("ms") is not None else ["–", "–"]
        body.append(cells)
    header = ["case", *(f"L={n} {unit}" for n in lengths for unit in ("ms", "MB"))]
    return table(header, body, align="l" + "rr" * len(lengths))


if __name__ == "__main__":
    main()
