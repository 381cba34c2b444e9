"""What `mlsa4rec study run` costs beyond training its cells: the engine (storage, trial bookkeeping,
the checks of each cell) and each cell's record (the run loaded back and its test users ranked under
both history rules), per cell, on a grid of tiny cells.

    python benchmarks/study_overhead.py --cells 8 --write    # -> docs/results/study_overhead.{json,md}

The time inside ``training.run.train`` is measured by wrapping it, the record by wrapping
``write_record``; the engine's share is the rest of the command's wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import command, machine, table, write_report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=8, help="cells in the grid (2 models x N/2 seeds)")
    parser.add_argument("--write", action="store_true", help="write docs/results/study_overhead.{json,md}")
    parser.add_argument("--out", help="write the report here instead (a path without suffix)")
    args = parser.parse_args(argv)

    import torch

    import mlsa4rec.experiments.study as study_module
    import mlsa4rec.training.run as run_module
    from conftest import successor_sequences, write_user_lines

    torch.set_num_threads(1)
    spent = {"train": 0.0, "record": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    run_module.train = timed("train", run_module.train)
    study_module.write_record = timed("record", study_module.write_record)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_user_lines(root / "succ.txt", successor_sequences(300, 30, seed=1))
        tiny = {"hidden_size": 8, "MAX_ITEM_LIST_LENGTH": 8, "epochs": 1, "train_batch_size": 64}
        spec = {"study": "overhead", "datasets": [str(data)], "seeds": list(range(1, args.cells // 2 + 1)),
                "models": {"gru4rec": {"set": tiny}, "sasrec": {"set": {**tiny, "inner_size": 16, "n_layers": 1,
                                                                         "n_heads": 1}}}}
        (root / "study.yaml").write_text(yaml.safe_dump(spec))
        t0 = time.perf_counter()
        assert study_module.run_study(root / "study.yaml", wait=False) is None
        wall = time.perf_counter() - t0
    cells = args.cells // 2 * 2
    engine = wall - spent["train"] - spent["record"]
    report = {"command": command(__file__, argv), "machine": machine(threads=1), "cells": cells,
              "wall_seconds": round(wall, 3), "train_seconds": round(spent["train"], 3),
              "record_seconds": round(spent["record"], 3), "engine_seconds_per_cell": round(engine / cells, 3),
              "record_seconds_per_cell": round(spent["record"] / cells, 3)}
    rows = [("engine (storage, trials, checks)", f"{report['engine_seconds_per_cell']:.3f}"),
            ("record (reload, rank test users twice)", f"{report['record_seconds_per_cell']:.3f}"),
            ("training (tiny cells, 1 epoch)", f"{spent['train'] / cells:.3f}")]
    markdown = "\n".join([
        "# What `mlsa4rec study run` costs per cell", "",
        f"`{report['command']}` on {report['machine']['cpu']} ({cells} tiny cells, one worker, SQLite storage, "
        "one torch thread). Seconds per cell:", "",
        table(["part", "seconds per cell"], rows, "lr"), "",
        "The engine's share includes the whole study's start (loading the study file, building every cell's "
        "config, opening the storage), spread over the cells.", ""])
    print(markdown)
    if args.write or args.out:
        stem = Path(args.out) if args.out else REPO / "docs" / "results" / "study_overhead"
        for path in write_report(stem, report, markdown):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
