"""Gate health of trained MLSA4Rec runs: the gate's values over the test users, at initialisation
and after training (issue 26: does the gate saturate?).

For each run directory: the trained model, and the same model as its training started (built from
the run's settings and seed), each read by ``mlsa4rec.evaluation.gate`` at every test user's last
history item. The page gives, per run and state, the mean and spread of act(W1 A), the share of
values near 0 (the Mamba branch shut), the share of pre-activations saturated on either side, and
a histogram of both states on shared bins.

    python benchmarks/gate_health.py studies/beauty-quick/runs/main/mlsa4rec-causal/amazon-beauty/seed-2020 \
        --out docs/results/gate_health

Writes OUT.json, OUT.md and OUT.png (the histograms); prints the table. ``--add`` keeps the runs
OUT.json already holds (each with the command and commit that measured it) and adds or replaces
the ones given: a study's run directories do not outlive the machine they trained on (its records
do), so each slice measures its own new runs and adds them to the page.

    python benchmarks/gate_health.py studies/reproduction/runs/main/mlsa4rec-causal/ml-1m/seed-2020 \
        --out docs/results/gate_health --add
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import command, git_commit, machine, table, write_report
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.evaluation.gate import BINS, NEAR_ZERO, SATURATION, gate_summary, gate_values
from mlsa4rec.runs.loading import build_run_model, load_run


def run_gates(run_dir: str, data_dir: str | None, batch_size: int) -> dict[str, Any]:
    run = load_run(run_dir, data_dir, device="cpu")
    config = run.config
    if config.model != "mlsa4rec":
        raise MLSA4RecError(f"{run_dir!r} is a {config.model} run; gate health reads MLSA4Rec runs")
    initial = build_run_model(config, run.items.n_items, device="cpu", seeded=True)
    length = config.train.max_seq_length
    states = {"initialisation": gate_values(initial, run.data, "test", length, batch_size),
              "trained": gate_values(run.model, run.data, "test", length, batch_size)}
    layers = []
    for i in range(len(states["trained"])):
        every = np.concatenate([states[s][i][1].ravel() for s in states])
        bins = np.linspace(every.min(), every.max(), BINS + 1)  # shared, so the histograms compare
        layers.append({state: gate_summary(*values[i], act=config.hyper.gate_act, bins=bins)
                       for state, values in states.items()})
    return {"run": str(run_dir), "variant": config.hyper.variant, "gate_act": config.hyper.gate_act,
            "dataset": str(config.dataset), "users": int(len(run.data.eval_targets("test"))), "layers": layers}


def earlier_results(stem: str) -> list[dict[str, Any]]:
    """The results OUT.json holds, each with the command and commit that measured it (``--add``)."""
    import json

    path = Path(f"{stem}.json")
    if not path.is_file():
        return []
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        results = report["results"]
        assert isinstance(results, list) and all(isinstance(r["run"], str) and r["layers"] for r in results)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise MLSA4RecError(f"--add: {str(path)!r} is not a gate_health.py report; pass another --out, or leave "
                            "out --add to write a new one there") from None
    return [{"command": report.get("command"), "commit": report.get("machine", {}).get("commit"), **r}
            for r in results]


def figure(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(7, 2.6 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        for state, style in (("initialisation", {"alpha": 0.5}), ("trained", {"alpha": 0.6})):
            h = r["layers"][0][state]["histogram"]
            edges = np.array(h["edges"])
            ax.stairs(np.array(h["counts"]) / max(sum(h["counts"]), 1), edges, fill=True, label=state, **style)
        dataset = Path(r["dataset"]).name.split(".")[0]  # a registered name, or the data file's stem
        ax.set_title(f"{dataset}, {Path(r['run']).name}: {r['variant']}, act = {r['gate_act']}", fontsize=9)
        ax.set_xlabel("gate value act(W1 A), every channel of every test user")
        ax.set_ylabel("share")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SATURATES = 1.0  # % of pre-activations where the activation is flat, above which a page says the gate saturates


def verdict(results: list[dict[str, Any]]) -> str:
    """The answer in one sentence, from the numbers: does a trained gate saturate or shut?"""
    def share(key: str, state: str) -> list[float]:
        return [100 * (r["layers"][0][state][key] or 0.0) for r in results]

    saturated = [max(a, b) for a, b in zip(share("saturated_low", "trained"), share("saturated_high", "trained"),
                                           strict=True)]
    shut, shut0 = share("near_zero", "trained"), share("near_zero", "initialisation")
    means = {state: [r["layers"][0][state]["mean"] for r in results] for state in ("initialisation", "trained")}
    word = "does not saturate" if max(saturated) <= SATURATES else f"saturates (above {SATURATES} %)"
    return (f"**In {len(results)} trained run(s) the gate {word}**: at most {max(saturated):.1f} % of the "
            f"pre-activations lie where the activation is flat on either side. {min(shut):.1f}-{max(shut):.1f} % "
            f"of its values are near 0 (channels of the Mamba branch shut), against {min(shut0):.1f}-"
            f"{max(shut0):.1f} % at initialisation; its mean moved from {min(means['initialisation']):.3f}-"
            f"{max(means['initialisation']):.3f} to "
            f"{min(means['trained']):.3f}-{max(means['trained']):.3f}.")


def page(report: dict[str, Any]) -> str:
    rows = []
    commands = list(dict.fromkeys(r["command"] for r in report["results"]))  # in order, each once
    for r in report["results"]:
        for state, s in r["layers"][0].items():
            q = s["quantiles"]
            rows.append([r["run"], r["variant"], state, f"{s['mean']:.3f}", f"{s['std']:.3f}",
                         f"{q['0.05']:.2f} / {q['0.5']:.2f} / {q['0.95']:.2f}", f"{100 * s['near_zero']:.1f} %",
                         f"{100 * s['saturated_low']:.1f} %",
                         "-" if s["saturated_high"] is None else f"{100 * s['saturated_high']:.1f} %"])
    return (f"# Gate health (issue 26)\n\nThe gate act(W1 A) of MLSA4Rec's interaction layer at every test user's "
            f"last history item, every channel, at initialisation (the run's seed) and after training. Near 0: "
            f"|value| < {NEAR_ZERO}; saturated: the pre-activation where the activation is flat (slope about 0.01 "
            f"or less: GELU below {SATURATION['gelu'][0]}, where above it GELU is the identity, so a dash; the sigmoid "
            f"below {SATURATION['sigmoid'][0]} or above {SATURATION['sigmoid'][1]}). "
            f"CPU: {report['machine']['cpu']}.\n\n"
            "```bash\n" + "\n".join(commands) + "\n```\n\n" + verdict(report["results"]) + "\n\n"
            + table(["run", "variant", "state", "mean", "std", "5 / 50 / 95 %", "near 0", "saturated low",
                     "saturated high"], rows, align="lllrrrrrr") + "\n"
            + (f"\n![gate histograms]({Path(report['figure']).name})\n" if report["figure"] else ""))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished MLSA4Rec runs")
    p.add_argument("--data-dir", help="where the runs' data is (default: where each run found it)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--out", help="write OUT.json, OUT.md and OUT.png")
    p.add_argument("--add", action="store_true",
                   help="keep the runs OUT.json holds; add the ones given (replacing those measured again)")
    args = p.parse_args(argv)
    if args.add and not args.out:
        p.error("--add needs --out (the report to add to)")
    this = {"command": command("gate_health.py", argv), "commit": git_commit()}
    try:
        kept = earlier_results(args.out) if args.add else []
        results = [{**this, **run_gates(r, args.data_dir, args.batch_size)} for r in args.run_dirs]
    except MLSA4RecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    again = {str(Path(r["run"])) for r in results}
    results = [r for r in kept if str(Path(r["run"])) not in again] + results
    report = {"command": this["command"], "machine": machine(torch.get_num_threads()),
              "figure": f"{args.out}.png" if args.out else None, "results": results}
    text = page(report)
    print(text)
    if args.out:
        figure(results, Path(f"{args.out}.png"))
        write_report(args.out, report, text)


if __name__ == "__main__":
    main()
