"""The compute plan of the reproduction study: machine-hours per cell from quiet epoch timings.

Seconds per epoch (training + one validation) come from ``epoch_time.py --study`` (its JSON, one
per study and dataset, in ``docs/results/``); the number of cells (seeds) from the study files
themselves; the epochs each cell will run are the assumptions below (a finished run's epochs where
one existed, else the recipe's cap), to be replaced by measured ones as cells finish.

    python benchmarks/epoch_time.py --study studies/reproduction.yaml --dataset amazon-beauty --full \\
        --full-limit 150 --steps 10 --json docs/results/epoch_time_study_reproduction_amazon-beauty.json
    python benchmarks/reproduction_plan.py      # prints the Markdown tables of reproduction_plan.md
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from mlsa4rec.experiments.study import MAIN, cell_config, dataset_name, load_study

REPO = Path(__file__).resolve().parents[1]
# label (as epoch_time.py names a case: the model, "/group" outside the main grid) -> epochs run
# to early stopping (the best epoch + the 11 validations of patience), per study and dataset kind
AMAZON = {"mlsa4rec-masked": 41, "mlsa4rec-causal": 36, "mamba4rec": 37, "sasrec": 44, "mlsa4rec-faithful": 32,
          "gru4rec": 44, "bert4rec": 41, "lightsans": 35, "linrec": 35, "performer": 35, "lrurec": 96}
EPOCHS = {
    ("reproduction", "amazon-beauty"): AMAZON,
    ("reproduction", "amazon-video-games"): AMAZON,
    # the all-positions recipe's cosine schedule runs its 60 epochs (mamba4rec-ml-1m-e60 stopped at 57)
    ("reproduction", "ml-1m"): {"mamba4rec/ml-1m-L200": 57, "*": 60},
    # the full causal model's three seeds are the reproduction study's own (adopted)
    ("ablations", "amazon-beauty"): {"mlsa4rec-causal": 0, "no-lsa": 40, "no-gate": 54, "no-interaction-mamba": 40,
                                     "no-norm-layers": 54, "lsa-on-embeddings": 54},
    ("long-sequences", "ml-1m"): {"*": 20},  # a fixed 20-epoch cosine (configs/*-ml-1m-quick.yaml)
}
BLOCKS = [("1. Beauty", "reproduction", "amazon-beauty"), ("1. Video Games", "reproduction", "amazon-video-games"),
          ("2. ML-1M", "reproduction", "ml-1m"), ("3. Ablations", "ablations", "amazon-beauty"),
          ("4. Long sequences", "long-sequences", "ml-1m")]


def cells_per_case(study_file: Path, dataset: str) -> tuple[Counter, dict[str, int]]:
    """How many cells each case has on ``dataset`` (its seeds), and how often its runs validate (eval_step)."""
    study = load_study(study_file, check=False)
    counts, eval_step = Counter(), {}
    for cell in study.cells:
        if dataset_name(cell.dataset) == dataset:
            case = cell.entry.label if cell.group == MAIN else f"{cell.entry.label}/{cell.group}"
            counts[case] += 1
            eval_step[case] = int(cell_config(cell, study)["eval_step"])
    return counts, eval_step


def block_table(title: str, study: str, dataset: str, results_dir: Path) -> tuple[str, float]:
    timings = json.loads((results_dir / f"epoch_time_study_{study}_{dataset}.json").read_text())
    counts, eval_step = cells_per_case(REPO / "studies" / f"{study}.yaml", dataset)
    epochs = EPOCHS[(study, dataset)]
    lines = [f"### {title} (`epoch_time_study_{study}_{dataset}.json`)", "",
             "| cell | s/epoch: train + valid | source | epochs | cells | h |", "|---|---:|---|---:|---:|---:|"]
    total = 0.0
    for r in timings["results"]:
        case = r["case"]
        train = r.get("measured_s_per_epoch") or r["projected_s_per_epoch"]
        source = "measured" if r.get("measured_s_per_epoch") else "projected"
        n_epochs = epochs.get(case, epochs.get("*"))
        validations = -(-n_epochs // eval_step[case])
        hours = (train * n_epochs + r["valid_seconds"] * validations) * counts[case] / 3600
        total += hours
        note = " (adopted)" if n_epochs == 0 else ""
        lines.append(f"| {case}{note} | {train} + {r['valid_seconds']} | {source} | {n_epochs} | {counts[case]} | "
                     f"{hours:.2f} |")
    lines.append(f"| **{title}** | | | | | **{total:.1f}** |")
    return "\n".join(lines), total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "docs" / "results"), help="where the timing JSONs are")
    args = parser.parse_args(argv)
    totals = []
    for title, study, dataset in BLOCKS:
        text, hours = block_table(title, study, dataset, Path(args.results))
        totals.append((title, hours))
        print(text, end="\n\n")
    print("| block | h |\n|---|---:|")
    for title, hours in totals:
        print(f"| {title} | {hours:.1f} |")
    print(f"| **Total (training)** | **{sum(h for _, h in totals):.1f}** |")


if __name__ == "__main__":
    main()
