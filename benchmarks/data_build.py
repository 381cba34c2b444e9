"""Time building each registered dataset from its file to ready training batches.

    python benchmarks/data_build.py --data-dir ../shared/data

Prints, per dataset: the cold build (read + k-core + remap + sort, no cache), the warm load from
the on-disk cache, and one full pass of the training sampler (prefix, L=50 and L=200).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from mlsa4rec.data import REGISTRY, load_dataset
from mlsa4rec.data.sampling import TrainSampler


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("MLSA4REC_DATA_DIR", "../shared/data"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["MLSA4REC_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlsa4rec-bench-")
    rows = []
    for name in REGISTRY:
        data, cold = timed(lambda n=name: load_dataset(n, args.data_dir))
        _, warm = timed(lambda n=name: load_dataset(n, args.data_dir))
        row = {"dataset": name, "interactions": data.n_interactions, "cold_build_s": round(cold, 3),
               "cached_load_s": round(warm, 3)}
        for scheme, length in (("prefix", 50), ("prefix", 200), ("all_positions", 200)):
            sampler = TrainSampler(data, scheme, length, 2048 if scheme == "prefix" else 32, seed=0,
                                   trim=scheme == "all_positions")
            _, epoch = timed(lambda s=sampler: sum(1 for _ in s))
            row[f"{scheme}_L{length}_epoch_of_batches_s"] = round(epoch, 3)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))


if __name__ == "__main__":
    main()
