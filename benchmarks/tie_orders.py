"""Amazon Beauty with other orders inside same-day ties, to measure how much the tie order moves results.

Beauty has day-granular timestamps and in 43 % of users the last two items share a day, so the
order inside a day decides many validation and test targets. Published RecBole numbers come from
RecBole's own conversion of the Amazon files, whose tie order (file position) we cannot rebuild:
the shared data has ICLRec's order and TiICSRec's, and timestamps aligned with ICLRec's file
(``shared/data/PROVENANCE.md``). This script writes, into a git-ignored folder, user-line files
with the same users, items and days but other orders inside each day:

* ``tiicsrec``: TiICSRec's file as it is (its own item ids);
* ``reversed``: each same-day group of ICLRec's order reversed;
* ``shuffled-S``: each same-day group shuffled with seed S;
* ``ascending``: each same-day group sorted by item id, an order by a catalogue key as RecBole's
  (file position, i.e. ASIN order) is. ICLRec's ids fall with popularity, so this order puts the
  rarer items of a day last, and the test targets become rarer.

Train on one with ``--dataset PATH`` (a user-line file is read like the registered datasets), e.g.
    python benchmarks/tie_orders.py --data-dir ../shared/data --out runs/tie-orders
    mlsa4rec train --model sasrec --dataset runs/tie-orders/beauty-reversed.txt.gz \\
        --config configs/sasrec-beauty.yaml --output-dir runs/ties/sasrec-reversed

For ML-1M, whose timestamps the shared data has for users 1-2,999 only (``ml-1m/extra``), it
writes ``ml-1m-users1-2999.txt.gz``: those users in the shared file's order. Beside the partial
``ratings.dat`` itself (read with a stable sort by time, i.e. RecBole's order inside ties), it
gives the same users, items and events in two tie orders.

It prints, per variant, the share of users whose validation or test target differs from ICLRec's
and the median and mean training popularity of the test targets (a popular target is easier).
The files are derived from the shared data and must not be committed (``runs/`` is ignored).
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
from pathlib import Path


def read_lines(path: Path) -> dict[int, list[int]]:
    """``user v_1 ... v_n`` lines as {user: [v_1, ..., v_n]}."""
    with gzip.open(path, "rt") as f:
        rows = (line.split() for line in f if line.strip())
        return {int(r[0]): [int(v) for v in r[1:]] for r in rows}


def day_groups(times: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of equal timestamps."""
    bounds, start = [], 0
    for i in range(1, len(times) + 1):
        if i == len(times) or times[i] != times[start]:
            bounds.append((start, i))
            start = i
    return bounds


def reorder(items: list[int], times: list[int], how: str, rng: random.Random | None = None) -> list[int]:
    """``items`` with each same-day group reversed, sorted or shuffled; the days stay in order."""
    if len(items) != len(times):
        raise ValueError("items and times differ in length")
    out: list[int] = []
    for a, b in day_groups(times):
        group = items[a:b]
        if how == "reversed":
            group.reverse()
        elif how == "ascending":
            group.sort()
        elif how == "shuffled":
            assert rng is not None
            rng.shuffle(group)
        else:
            raise ValueError(f"unknown order {how!r}")
        out.extend(group)
    return out


def write_lines(path: Path, seqs: dict[int, list[int]]) -> None:
    """Write atomically (a temp file beside ``path``, then a rename) and reproducibly (no gzip mtime)."""
    tmp = path.with_name(path.name + ".tmp")
    text = "".join(" ".join(map(str, (u, *seqs[u]))) + "\n" for u in sorted(seqs))
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(text.encode())
    os.replace(tmp, path)


def changed_targets(base: dict[int, list[int]], other: dict[int, list[int]]) -> tuple[float, float]:
    """Share of users whose validation (second-to-last) and test (last) item differ from ``base``'s."""
    n = len(base)
    valid = sum(base[u][-2] != other[u][-2] for u in base) / n
    test = sum(base[u][-1] != other[u][-1] for u in base) / n
    return valid, test


def id_map(base: dict[int, list[int]], other: dict[int, list[int]], times: dict[int, list[int]]) -> dict[int, int]:
    """``other``'s item ids in ``base``'s, learned from items alone on their day (unambiguous places)."""
    mapping: dict[int, int] = {}
    for u, ts in times.items():
        for a, b in day_groups(ts):
            if b - a == 1:
                mapping[other[u][a]] = base[u][a]
    return mapping


def target_popularity(seqs: dict[int, list[int]]) -> tuple[float, float]:
    """Median and mean number of events of the test targets' items (counted over all events)."""
    counts: dict[int, int] = {}
    for seq in seqs.values():
        for i in seq:
            counts[i] = counts.get(i, 0) + 1
    pops = sorted(counts[seq[-1]] for seq in seqs.values())
    return float(pops[len(pops) // 2]), sum(pops) / len(pops)


PARTIAL = "ratings.users1-2999.partial.dat.gz"


def write_ml1m_half(ml1m: Path, out: Path) -> None:
    """The shared ML-1M order for the users of the partial ratings.dat, and how often it differs."""
    with gzip.open(ml1m / "extra" / PARTIAL, "rt") as f:
        rows = [line.split("::") for line in f if line.strip()]
    events: dict[int, list[tuple[int, int]]] = {}
    for i, (u, item, _, t) in enumerate(rows):
        events.setdefault(int(u), []).append((int(t), i, int(item)))  # (time, file position): a stable sort
    recbole = {u: [item for _, _, item in sorted(ev)] for u, ev in events.items()}
    shared = {u: seq for u, seq in read_lines(ml1m / "ml-1m.seq.txt.gz").items() if u in recbole}
    if any(sorted(shared[u]) != sorted(recbole[u]) for u in recbole):
        raise ValueError("the partial ratings.dat and ml-1m.seq.txt.gz disagree on a user's items")
    path = out / "ml-1m-users1-2999.txt.gz"
    write_lines(path, shared)
    v, t = changed_targets(recbole, shared)
    print(f"{path}: users 1-2,999 in the shared file's order; against ratings.dat's order (RecBole's) the "
          f"validation target differs for {v:.1%} of users, the test target for {t:.1%}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/tie-orders")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
    args = ap.parse_args(argv)
    data = Path(args.data_dir) / "beauty"
    if not (data / "Beauty.txt.gz").is_file():
        print(f"error: {data / 'Beauty.txt.gz'} not found; pass --data-dir pointing at shared/data", file=sys.stderr)
        return 2
    items = read_lines(data / "Beauty.txt.gz")
    times = read_lines(data / "Beauty_time.tiicsrec.txt.gz")
    if items.keys() != times.keys() or any(len(items[u]) != len(times[u]) for u in items):
        print("error: Beauty.txt and Beauty_time.tiicsrec.txt do not align user by user", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = {how: {u: reorder(items[u], times[u], how) for u in items} for how in ("reversed", "ascending")}
    for s in args.seeds:
        rng = random.Random(s)
        variants[f"shuffled-{s}"] = {u: reorder(items[u], times[u], "shuffled", rng) for u in sorted(items)}
    tied_last = sum(t[-1] == t[-2] for t in times.values()) / len(times)
    print(f"users whose last two items share a day: {tied_last:.1%}")
    median, mean = target_popularity(items)
    print(f"ICLRec's order: test targets' popularity median {median:.0f}, mean {mean:.1f}")
    for name, seqs in variants.items():
        path = out / f"beauty-{name}.txt.gz"
        write_lines(path, seqs)
        v, t = changed_targets(items, seqs)
        median, mean = target_popularity(seqs)
        print(f"{path}: validation target differs for {v:.1%} of users, test target for {t:.1%}; test targets' "
              f"popularity median {median:.0f}, mean {mean:.1f}")
    ml1m = Path(args.data_dir) / "ml-1m"
    if (ml1m / "ml-1m.seq.txt.gz").is_file() and (ml1m / "extra" / PARTIAL).is_file():
        write_ml1m_half(ml1m, out)
    tiicsrec = read_lines(data / "Beauty_item.tiicsrec.txt.gz")
    path = out / "beauty-tiicsrec.txt.gz"
    write_lines(path, tiicsrec)
    mapping = id_map(items, tiicsrec, times)
    mapped = {u: [mapping.get(i, -1) for i in seq] for u, seq in tiicsrec.items()}
    v, t = changed_targets(items, mapped)
    median, mean = target_popularity(tiicsrec)
    print(f"{path} (TiICSRec's ids; {len(mapping)} of {len({i for s in items.values() for i in s})} items "
          f"mapped): validation target differs for {v:.1%} of users, test target for {t:.1%}; test targets' "
          f"popularity median {median:.0f}, mean {mean:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
