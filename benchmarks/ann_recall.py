"""Recall and latency of serving's approximate index (``--ann hnsw``) against the exact chunked top k.

    OMP_NUM_THREADS=1 python benchmarks/ann_recall.py --items 1000000 --ef 128 256 512 1024 2048

A random item table (standard normal, D = 64, row 0 zeros: the hard case for a graph index, with
no clusters to follow) and random user vectors. For each request: the exact top 10 through
``Recommender.rank_ids`` (chunks of ``serving.recommender.SCORE_CHUNK`` items), the whole row
through ``torch.topk`` (serving before issue 27), and the index at each ``--ef``, with recall@10
against the exact top 10. Latency is one request's ranking from its user vector (the model's
forward, the same for every path, is left out). Also the index's build time, file size and the
memory it added. Prints JSON; ``--index FILE`` reuses a saved index (a 10^6 build takes about 20
minutes on one thread) and saves a new one there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import machine, write_json


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def _percentiles(seconds: list[float]) -> dict[str, float]:
    s = sorted(seconds)
    p99 = s[min(len(s) - 1, int(0.99 * len(s)))]
    return {"p50_ms": round(1000 * s[len(s) // 2], 3), "p99_ms": round(1000 * p99, 3)}


def measure(n_items: int, efs: list[int], requests: int = 200, dim: int = 64, index_file: Path | None = None,
            k: int = 10) -> dict[str, Any]:
    from mlsa4rec.config import build_config
    from mlsa4rec.data.itemmap import ItemMap
    from mlsa4rec.models import create
    from mlsa4rec.ops.ranking import top_items
    from mlsa4rec.serving import Recommender
    from mlsa4rec.serving.ann import ItemIndex
    from mlsa4rec.serving.recommender import SCORE_CHUNK

    g = torch.Generator().manual_seed(0)
    table = torch.randn(n_items + 1, dim, generator=g)
    table[0] = 0
    users = torch.randn(requests, dim, generator=g)
    # a Recommender over the random table: the model is never run (rank_ids takes user vectors)
    settings = {"MAX_ITEM_LIST_LENGTH": 8, "hidden_size": dim, "n_layers": 1, "n_heads": 1, "inner_size": dim}
    model = create("sasrec", n_items, **settings)
    items = ItemMap(list(range(1, n_items + 1)), np.ones(n_items, dtype=np.int64))
    rec = Recommender(model, build_config("sasrec", overrides=settings), items, torch.device("cpu"))
    rec.__dict__["item_table"] = table  # the cached property, set to the random table

    def whole_row(user: torch.Tensor) -> list[int]:  # serving before issue 27: B x (n + 1) scores and topk
        scores = (user @ table.t()).float()
        scores[:, 0] = float("-inf")
        return torch.topk(scores, k, dim=1).indices[0].tolist()

    def timed(fn) -> tuple[list[Any], dict[str, float]]:
        for u in users[:5]:  # warm-up
            fn(u[None])
        out, seconds = [], []
        for u in users:
            t0 = time.perf_counter()
            out.append(fn(u[None]))
            seconds.append(time.perf_counter() - t0)
        return out, _percentiles(seconds)

    result: dict[str, Any] = {"items": n_items, "dim": dim, "requests": requests, "k": k,
                              "score_chunk": SCORE_CHUNK, "torch_threads": torch.get_num_threads()}
    with torch.inference_mode():
        exact = top_items(users, table, k, SCORE_CHUNK)[0].tolist()
        _, result["exact_chunked"] = timed(lambda u: rec.rank_ids(u, k))
        old, result["whole_row"] = timed(whole_row)
        result["whole_row_equals_exact"] = sum(o == e for o, e in zip(old, exact))
        before, t0 = _rss_mb(), time.perf_counter()
        if index_file is not None and index_file.exists():
            index = ItemIndex.load(index_file, table)
            result["index_loaded_s"] = round(time.perf_counter() - t0, 1)
        else:
            index = ItemIndex.build(table)
            result["index_build_s"] = round(time.perf_counter() - t0, 1)
            if index_file is not None:
                index.save(index_file)
                result["index_file_mb"] = round(index_file.stat().st_size / 2 ** 20, 1)
        result["index_rss_growth_mb"] = round(_rss_mb() - before, 1)
        result["table_mb"] = round(table.numel() * 4 / 2 ** 20, 1)
        rec.index = index
        for ef in efs:
            index.expansion_search = ef
            got, latency = timed(lambda u: rec.rank_ids(u, k))
            recall = np.mean([len({r.item for r in a[0]} & set(e)) / k for a, e in zip(got, exact)])
            result[f"ann_ef{ef}"] = {"recall@10": round(float(recall), 4), **latency}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=lambda s: int(float(s)), default=1_000_000)
    parser.add_argument("--ef", type=int, nargs="+", default=[128, 256, 512, 1024, 2048],
                        help="the index's search breadths to measure (serve --ann-ef)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--index", type=Path, help="a saved index to reuse (made and saved there when missing)")
    parser.add_argument("--save", type=Path, help="also keep the result in this JSON file, by catalogue size, with "
                                                  "its command (docs/results/ann_recall.json: scale.md reads it)")
    args = parser.parse_args(argv)
    try:
        import usearch  # noqa: F401
    except ImportError:
        raise SystemExit("error: usearch is not installed; pip install 'mlsa4rec[ann]'") from None
    result = measure(args.items, args.ef, args.requests, index_file=args.index)
    result["machine"] = machine(threads=torch.get_num_threads())
    print(json.dumps(result, indent=2))
    if args.save:
        save(result, args.save, "python benchmarks/ann_recall.py " + " ".join(sys.argv[1:] if argv is None else argv))


def save(result: dict[str, Any], path: Path, command: str) -> None:
    """Keep ``result`` in ``path`` under its catalogue size (a later measurement of that size replaces it)."""
    kept = json.loads(path.read_text()) if path.is_file() else {}
    kept[str(result["items"])] = {**result, "command": command}
    write_json(path, dict(sorted(kept.items(), key=lambda kv: int(kv[0]))))


if __name__ == "__main__":
    main()
