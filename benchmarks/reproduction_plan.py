"""The compute plan of the reproduction study: machine-hours per cell from quiet epoch timings.

Seconds per epoch (training + one validation) come from ``epoch_time.py --study`` (its JSON, one
per study and dataset, in ``docs/results/``); the number of cells (seeds) from the study files
themselves; the epochs each cell will run are the mean of its finished seeds' (their records in the
study directory), else those of the same model's finished cells on a sibling dataset (Video Games
from Beauty: the same recipe on a catalogue of the same kind), else the assumptions below (a finished
run's epochs where one existed, else the recipe's cap). Hours done are the finished cells' own
training seconds (as they ran, other work possibly beside them).

    python benchmarks/epoch_time.py --study studies/reproduction.yaml --dataset amazon-beauty --full \\
        --full-limit 150 --steps 10 --json docs/results/epoch_time_study_reproduction_amazon-beauty.json
    python benchmarks/reproduction_plan.py      # prints the Markdown tables of reproduction_plan.md
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from mlsa4rec.experiments.study import MAIN, cell_config, dataset_name, load_study, read_record

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
# a block whose cells, until their own seeds finish, are expected to run as many epochs as the same
# model's finished cells in this other (study, dataset)
SIBLING = {("reproduction", "amazon-video-games"): ("reproduction", "amazon-beauty", "Beauty's")}
BLOCKS = [("1. Beauty", "reproduction", "amazon-beauty"), ("1. Video Games", "reproduction", "amazon-video-games"),
          ("2. ML-1M", "reproduction", "ml-1m"), ("3. Ablations", "ablations", "amazon-beauty"),
          ("4. Long sequences", "long-sequences", "ml-1m")]
# a block timed by another command than epoch_time_study_STUDY_DATASET.json names (long sequences: whole
# epochs, each case in its own process, for benchmarks/long_sequences.py)
TIMINGS = {("long-sequences", "ml-1m"): "epoch_time_long_sequences_isolated.json"}
# cases timed again after a change that tests show leaves their outputs unchanged, only faster: the
# row of this JSON (same case label) replaces the block's
RETIMED = {("reproduction", dataset): {"lightsans": f"epoch_time_lightsans_last_row_{dataset}.json"}
           for dataset in ("amazon-beauty", "amazon-video-games")}
# validation passes measured faster since the block was timed (evaluation in pieces of 16,384 positions:
# the same ranks): the block's valid seconds are divided by the ratio of the two bounds in this JSON's case
VALID_FILE = "eval_forward_tokens.json"
REVALIDATED = {("reproduction", "ml-1m"): {"mlsa4rec-causal": "mlsa4rec-causal ml-1m L50",
                                           "mamba4rec": "mamba4rec ml-1m L50",
                                           "mlsa4rec-causal/ml-1m-L200": "mlsa4rec-causal ml-1m L200",
                                           "mamba4rec/ml-1m-L200": "mamba4rec ml-1m L200",
                                           "sasrec/ml-1m-L200": "sasrec ml-1m L200"}}


def cells_per_case(study_file: Path, dataset: str) -> tuple[Counter, dict[str, int], dict[str, list[dict]]]:
    """How many cells each case has on ``dataset`` (its seeds), how often its runs validate
    (eval_step), and the records of its cells that have finished (in the study's directory)."""
    study = load_study(study_file, check=False)
    counts, eval_step, finished = Counter(), {}, {}
    for cell in study.cells:
        if dataset_name(cell.dataset) == dataset:
            case = cell.entry.label if cell.group == MAIN else f"{cell.entry.label}/{cell.group}"
            counts[case] += 1
            eval_step[case] = int(cell_config(cell, study)["eval_step"])
            record = cell.record_path(study.directory)
            if record.is_file():
                finished.setdefault(case, []).append(read_record(record)[0])
    return counts, eval_step, finished


def mean_epochs(records: list[dict]) -> int:
    """The epochs that finished cells ran, on average (rounded)."""
    return round(sum(m["epochs_run"] for m in records) / len(records))


def block_table(title: str, study: str, dataset: str, results_dir: Path) -> tuple[str, float, float]:
    """The block's Markdown table and its hours done (the finished cells' own training seconds) and
    left (the cells not finished, at the quiet s/epoch and the epochs their finished seeds ran, else
    those of their model on the sibling dataset, else (a group's repeat at another setting) those of
    their model in the main group, else the assumption)."""
    name = TIMINGS.get((study, dataset), f"epoch_time_study_{study}_{dataset}.json")
    timings = json.loads((results_dir / name).read_text())
    retimed = {}
    for case, file in RETIMED.get((study, dataset), {}).items():
        rows = {r["case"]: r for r in json.loads((results_dir / file).read_text())["results"]}
        if case not in rows:
            raise SystemExit(f"error: {file} has no row of case {case!r}; time it again (its command is in the file)")
        retimed[case] = rows[case]
    speedup = {}
    if (study, dataset) in REVALIDATED:
        rows = {r["case"]: r["seconds"] for r in json.loads((results_dir / VALID_FILE).read_text())["results"]}
        speedup = {case: rows[label]["0"] / rows[label]["16384"]
                   for case, label in REVALIDATED[(study, dataset)].items()}
    counts, eval_step, finished = cells_per_case(REPO / "studies" / f"{study}.yaml", dataset)
    sibling, whose = {}, ""
    if (study, dataset) in SIBLING:
        other_study, other_dataset, whose = SIBLING[(study, dataset)]
        sibling = cells_per_case(REPO / "studies" / f"{other_study}.yaml", other_dataset)[2]
    epochs = EPOCHS[(study, dataset)]
    lines = [f"### {title} (`{name}`)", "",
             "| cell | s/epoch: train + valid | source | epochs | cells: done / all | h: done / left |",
             "|---|---:|---|---:|---:|---:|"]
    done_total = left_total = 0.0
    for r in timings["results"]:
        case = r["case"]
        r = retimed.get(case, r)
        train = r.get("measured_s_per_epoch") or r["projected_s_per_epoch"]
        source = ("measured" if r.get("measured_s_per_epoch") else "projected") + (" again" if case in retimed else "")
        valid = r["valid_seconds"]
        if case in speedup:  # the pass measured faster since: its ratio applied to this block's figure
            valid = round(valid / speedup[case], 1)
            source += f", valid ÷ {speedup[case]:.2f}"

        records = finished.get(case, [])
        if records:
            n_epochs = mean_epochs(records)
            shown = f"{n_epochs} (its {len(records)} finished)"
        elif case in sibling:
            n_epochs = mean_epochs(sibling[case])
            shown = f"{n_epochs} ({whose} {len(sibling[case])} finished)"
        elif "/" in case and case.split("/")[0] in finished:  # a group's repeat: its model's main-group runs
            main_records = finished[case.split("/")[0]]
            n_epochs = mean_epochs(main_records)
            shown = f"{n_epochs} (main group's {len(main_records)} finished)"
        else:
            n_epochs = epochs.get(case, epochs.get("*"))
            shown = f"{n_epochs} (assumed)" if n_epochs else "0 (adopted)"
        validations = -(-n_epochs // eval_step[case])
        left = (train * n_epochs + valid * validations) * (counts[case] - len(records)) / 3600
        done = sum(m["train_seconds"] for m in records) / 3600
        done_total, left_total = done_total + done, left_total + left
        lines.append(f"| {case} | {train} + {valid} | {source} | {shown} | {len(records)} / "
                     f"{counts[case]} | {done:.2f} / {left:.2f} |")
    lines.append(f"| **{title}** | | | | | **{done_total:.1f} / {left_total:.1f}** |")
    return "\n".join(lines), done_total, left_total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "docs" / "results"), help="where the timing JSONs are")
    args = parser.parse_args(argv)
    totals = []
    for title, study, dataset in BLOCKS:
        text, done, left = block_table(title, study, dataset, Path(args.results))
        totals.append((title, done, left))
        print(text, end="\n\n")
    print("| block | h: done | h: left |\n|---|---:|---:|")
    for title, done, left in totals:
        print(f"| {title} | {done:.1f} | {left:.1f} |")
    print(f"| **Total (training)** | **{sum(t[1] for t in totals):.1f}** | **{sum(t[2] for t in totals):.1f}** |")

if __name__ == "__main__":
    main()
