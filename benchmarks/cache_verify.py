"""What verifying the processed-dataset cache costs, at the scale of a real catalog.

    python benchmarks/cache_verify.py [--events 50000000] [--users 1000000] [--items 1000000]

Writes a synthetic processed dataset through the cache's own writer, then times reading its arrays
back plainly (``np.load``) against the verified load (every array's SHA-256, the key, the
structural checks: ``load_cached``). The difference is what the check adds to every `train`,
`evaluate`, `compare` and `data stats` that finds the cache.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common import machine, repeat_timed
from mlsa4rec.data.dataset import SequenceData, load_cached, save_cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, args.events), args.users - 1, replace=False))
    offsets = np.concatenate([[0], cuts, [args.events]]).astype(np.int64)
    items = rng.integers(1, args.items + 1, args.events, dtype=np.int64)
    data = SequenceData("synthetic", items, offsets, np.arange(args.items + 1, dtype=np.int64),
                        np.arange(args.users, dtype=np.int64), "fingerprint")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.npz"
        save_cached(data, path, "key")

        def plain_load() -> None:
            with np.load(path, allow_pickle=False) as z:
                _ = [z[name] for name in ("items", "offsets", "item_tokens", "user_tokens")]

        def verified_load() -> None:
            assert load_cached(path, "key", "synthetic") is not None

        # no warm-up: the first plain read pulls the file into the page cache for both
        plain = repeat_timed(plain_load, args.repeats, warmup=0)
        verified = repeat_timed(verified_load, args.repeats, warmup=0)
    m = machine(commit=False)
    print(f"machine: {m['cpu']}, {m['cores']} cores; {args.events:,} events, {args.users:,} users, "
          f"{args.items:,} items")
    print(f"plain np.load of the arrays: {min(plain):.3f} s (best of {args.repeats})")
    print(f"verified load (load_cached): {min(verified):.3f} s (best of {args.repeats}); the check adds "
          f"{min(verified) - min(plain):.3f} s")


if __name__ == "__main__":
    main()
