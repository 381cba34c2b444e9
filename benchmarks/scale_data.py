"""Synthetic interaction data at a practitioner's scale, seeded, for the scaling benchmark.

    python benchmarks/scale_data.py --items 1000000 --events 50000000 --out /tmp/scale/i1e6-e5e7.parquet

What it has, and why each property is there:

* **power-law item popularity**: item draws follow a Zipf law (p ∝ rank^-alpha, alpha 1.0 by
  default, ranks shuffled over the ids), as real catalogues do; so the 5-core filter bites on
  the tail, and popularity-based negatives differ from uniform ones;
* **sequential structure a model can learn**: items sit on a hidden ring; most events step a few
  places along the ring from the user's previous item (``--follow``, default 0.7), the rest jump to
  a popularity draw; so "next item" is predictable from "last item" and a sequential model beats
  popularity, as on real data;
* **a long tail of history lengths**: lognormal lengths (sigma 1.0, at least ``--min-length``),
  scaled to the requested number of events;
* **timestamps**: each user starts at a uniform time in one year and adds exponential gaps, so a
  global time split has users on both sides; no two events of a user share a second, so the data
  has no duplicates.

Everything is vectorised (numpy); the Parquet file is written in row groups by pyarrow, the CSV
(``.csv``, for the readers of today) with pandas. Same arguments and seed, same file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

YEAR = 365 * 24 * 3600
T0 = 1_600_000_000  # 2020-09-13: an arbitrary, fixed origin


def history_lengths(rng: np.random.Generator, events: int, mean_length: float, min_length: int) -> np.ndarray:
    """Lognormal user history lengths (sigma 1), at least ``min_length``, summing to ``events`` exactly."""
    n_users = max(1, int(events // mean_length))
    raw = rng.lognormal(mean=0.0, sigma=1.0, size=n_users)
    lengths = np.maximum(min_length, np.round(raw * (mean_length / raw.mean()))).astype(np.int64)
    diff = int(lengths.sum()) - events
    if diff < 0:  # too few: one more event for randomly chosen users
        np.add.at(lengths, rng.integers(0, n_users, size=-diff), 1)
    elif diff > 0:  # too many (the floor at min_length added some): take them in proportion to what is above it
        spare = lengths - min_length
        take = diff * spare // max(int(spare.sum()), 1)
        rest = diff - int(take.sum())                      # < n_users: one more from the users with most left
        take[np.argsort(-(spare - take), kind="stable")[:rest]] += 1
        lengths -= take
    return lengths


def generate(items: int, events: int, seed: int = 0, mean_length: float = 20.0, min_length: int = 5,
             follow: float = 0.7, alpha: float = 1.0, max_step: int = 8) -> dict[str, np.ndarray]:
    """Columns ``user_id``, ``item_id``, ``timestamp`` (int64), users' events back to back in time order."""
    rng = np.random.default_rng(seed)
    lengths = history_lengths(rng, events, mean_length, min_length)
    n = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # popularity: Zipf weights over ranks, the ranks shuffled over the ring positions
    weights = np.arange(1, items + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(weights[rng.permutation(items)])
    cdf /= cdf[-1]
    # ring position of every event: a jump (popularity draw) or the previous position plus a small step
    jump = rng.random(n) >= follow
    jump[starts] = True                                              # a user's first event is a draw
    drawn = np.minimum(np.searchsorted(cdf, rng.random(int(jump.sum()))), items - 1)
    steps = rng.integers(1, max_step + 1, size=n)
    steps[jump] = 0
    walked = np.cumsum(steps)                                        # steps since the file's start
    segment = np.cumsum(jump) - 1                                    # the jump each event follows
    base = drawn[segment]
    position = (base + walked - walked[np.flatnonzero(jump)][segment]) % items
    item_of_position = rng.permutation(items).astype(np.int64) + 1   # ring position -> item id (1..items)
    users = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int64), lengths)
    gaps = np.ceil(rng.exponential(3 * 24 * 3600, size=n)).astype(np.int64) + 1
    gaps[starts] = T0 + rng.integers(0, YEAR, size=len(lengths))    # the first event: the user's start
    stamp = np.cumsum(gaps)
    stamp -= np.repeat(stamp[starts] - gaps[starts], lengths)       # restart the running sum per user
    return {"user_id": users, "item_id": item_of_position[position], "timestamp": stamp}


def write(columns: dict[str, np.ndarray], out: Path, row_group: int = 1_000_000) -> None:
    """Parquet (``.parquet``) through pyarrow, or CSV with a header (``.csv``), to a temporary name then renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(columns)
        pq.write_table(table, tmp, row_group_size=row_group, compression="zstd")
    elif out.suffix == ".csv":
        import pandas as pd

        with open(tmp, "w") as fh:
            for lo in range(0, len(columns["user_id"]), row_group):
                part = pd.DataFrame({k: v[lo:lo + row_group] for k, v in columns.items()})
                part.to_csv(fh, index=False, header=lo == 0)
    else:
        raise SystemExit(f"error: --out must end in .parquet or .csv, got {str(out)!r}")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=float, required=True, help="catalogue size (1e6 is accepted)")
    parser.add_argument("--events", type=float, required=True, help="number of events (5e7 is accepted)")
    parser.add_argument("--out", type=Path, required=True, help="FILE.parquet or FILE.csv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mean-length", type=float, default=20.0, help="mean history length")
    parser.add_argument("--min-length", type=int, default=5)
    parser.add_argument("--follow", type=float, default=0.7, help="share of events that step along the ring")
    args = parser.parse_args(argv)
    items, events = int(args.items), int(args.events)
    if items < 2 or events < args.min_length:
        raise SystemExit("error: --items must be >= 2 and --events >= --min-length")
    t0 = time.perf_counter()
    columns = generate(items, events, args.seed, args.mean_length, args.min_length, args.follow)
    write(columns, args.out)
    print(f"{args.out}: {len(columns['user_id']):,} events, {int(columns['user_id'][-1]):,} users, "
          f"{items:,} items in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
