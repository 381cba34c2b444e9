"""An approximate nearest-neighbour index over a run's item table, for catalogs of millions of items.

    index = ItemIndex.build(table)                  # HNSW over rows 1..n, inner product (the model's score)
    index.save("items.usearch")                      # + items.usearch.json: what it was built from
    index = ItemIndex.load("items.usearch", table)   # refused unless built from this very table
    keys, found = index.search(users, count)         # B x count candidate ids (1..n), how many per row

The library is usearch (``pip install 'mlsa4rec[ann]'``): wheels for Linux, macOS and Windows on every
supported Python, inner product built in, no OpenMP of its own beside torch's, and an index file that
is memory-mapped when loaded. Its answers are candidates only: ``Recommender`` scores them again
exactly against the item table, applies the exclusions (it asks for k + the number excluded, then
filters) and falls back to the exact chunked ranking for a row that is left with too few. What is
approximate is which items are found: an item the graph search misses is missing from the top k
(recall@10 below 1; ``docs/serving.md`` gives what was measured).

The index stores its vectors in float16 by default (half the memory of float32; the candidates'
scores are recomputed in float32 anyway) beside the HNSW graph (``connectivity`` links per item).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlsa4rec.errors import BrokenModelError, MLSA4RecError
from mlsa4rec.fileio import write_atomic, write_json_atomic

ANN_KINDS = ("hnsw",)
INSTALL_HINT = "pip install 'mlsa4rec[ann]'"
CONNECTIVITY = 32      # HNSW's M: links per item and layer
EXPANSION_ADD = 128    # candidates kept while inserting (build time against graph quality)
EXPANSION_SEARCH = 512  # candidates kept while searching (latency against recall); at least count
DTYPE = "f16"
_KIND = "mlsa4rec item index"


def require_usearch(what: str = "ann='hnsw'") -> Any:
    """usearch's ``Index`` class, or the one-line error naming the extra to install."""
    try:
        from usearch.index import Index
    except ImportError:
        raise MLSA4RecError(f"{what} needs the usearch package, which is not installed: {INSTALL_HINT}") from None
    return Index


def table_digest(table: np.ndarray) -> str:
    """SHA-256 of a float32 item table's bytes (shape and dtype included): what an index was built from."""
    digest = hashlib.sha256(f"{table.dtype.str}:{table.shape};".encode())
    digest.update(memoryview(np.ascontiguousarray(table)).cast("B"))
    return digest.hexdigest()


def _real_rows(table: torch.Tensor) -> np.ndarray:
    """Rows 1..n of the (n + 1) x D table as float32 numpy (row 0, padding, is never indexed)."""
    rows = table.detach()[1:].float().cpu().contiguous().numpy()
    if not np.isfinite(rows).all():
        bad = int(np.nonzero(~np.isfinite(rows).all(axis=1))[0][0]) + 1
        raise BrokenModelError(f"the item table holds NaN or infinite values (item {bad}): the run's weights are "
                               "broken; retrain it or load it again")
    return rows


class ItemIndex:
    """HNSW over the item table's real rows, keyed by model id (1..n), inner-product metric."""

    def __init__(self, index: Any, info: dict[str, Any]) -> None:
        self.index = index
        self.info = info
        self.n_items: int = info["n_items"]

    @classmethod
    def build(cls, table: torch.Tensor, *, connectivity: int = CONNECTIVITY, expansion_add: int = EXPANSION_ADD,
              expansion_search: int = EXPANSION_SEARCH, dtype: str = DTYPE, threads: int | None = None) -> ItemIndex:
        """Index rows 1..n of ``table`` ((n + 1) x D). ``threads``: building threads (default torch's)."""
        Index = require_usearch()
        rows = _real_rows(table)
        started = time.perf_counter()
        index = Index(ndim=rows.shape[1], metric="ip", dtype=dtype, connectivity=connectivity,
                      expansion_add=expansion_add, expansion_search=expansion_search, enable_key_lookups=False)
        index.add(np.arange(1, rows.shape[0] + 1, dtype=np.uint64), rows,
                  threads=torch.get_num_threads() if threads is None else threads)
        info = {"kind": _KIND, "library": "usearch", "version": _usearch_version(), "metric": "ip", "dtype": dtype,
                "n_items": int(rows.shape[0]), "dim": int(rows.shape[1]), "connectivity": connectivity,
                "expansion_add": expansion_add, "table_sha256": table_digest(rows),
                "build_s": round(time.perf_counter() - started, 3)}
        return cls(index, info)

    @classmethod
    def load(cls, path: str | os.PathLike[str], table: torch.Tensor,
             expansion_search: int = EXPANSION_SEARCH) -> ItemIndex:
        """The index saved at ``path`` (memory-mapped), refused unless its ``PATH.json`` says it was
        built from this very ``table`` (the SHA-256 of its rows)."""
        Index = require_usearch()
        path = Path(path)
        sidecar = _sidecar(path)
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MLSA4RecError(f"the item index {str(path)!r} has no {sidecar.name} beside it (what it was built "
                                "from); delete the index, and a new one is built and saved there") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise MLSA4RecError(f"cannot read {str(sidecar)!r} ({exc}); delete the item index and its .json to "
                                "build them again") from None
        rows = _real_rows(table)
        if not isinstance(info, dict) or info.get("kind") != _KIND:
            raise MLSA4RecError(f"{str(sidecar)!r} does not describe an mlsa4rec item index")
        if info.get("table_sha256") != table_digest(rows):
            raise MLSA4RecError(f"the item index {str(path)!r} was built from another item table (another run, or "
                                "another training of it); delete it (and its .json) to build one for this run")
        try:
            index = Index.restore(str(path), view=True)
        except Exception as exc:  # a damaged or truncated file
            raise MLSA4RecError(f"cannot load the item index {str(path)!r}: {exc}; delete it (and its .json) to "
                                "build it again") from None
        if index is None or index.size != rows.shape[0] or index.ndim != rows.shape[1]:
            raise MLSA4RecError(f"the item index {str(path)!r} does not hold this run's {rows.shape[0]} items of "
                                f"{rows.shape[1]} dimensions; delete it (and its .json) to build it again")
        index.expansion_search = expansion_search
        return cls(index, info)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` and what it was built from to ``PATH.json``, each atomically."""
        path = Path(path)
        write_atomic(path, lambda temp: self.index.save(str(temp)))
        write_json_atomic(_sidecar(path), self.info)

    @property
    def expansion_search(self) -> int:
        return int(self.index.expansion_search)

    @expansion_search.setter
    def expansion_search(self, value: int) -> None:
        self.index.expansion_search = int(value)

    @property
    def memory_bytes(self) -> int:
        return int(self.index.memory_usage)

    def search(self, users: torch.Tensor, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``count`` items of highest inner product with each of the B user vectors, as the graph
        search finds them: B x count int64 model ids (0 past a row's end) and how many each row got."""
        count = max(1, min(int(count), self.n_items))
        query = users.detach().float().cpu().contiguous().numpy()
        if query.shape[0] == 0:
            return np.zeros((0, count), dtype=np.int64), np.zeros(0, dtype=np.int64)
        found = self.index.search(query, count, threads=torch.get_num_threads())  # the queries in parallel
        keys = np.asarray(found.keys, dtype=np.int64).reshape(query.shape[0], -1)
        counts = np.asarray(getattr(found, "counts", [keys.shape[1]]), dtype=np.int64).reshape(-1)
        if query.shape[0] == 1 and keys.shape[1] < count:  # one query: Matches, as long as what it found
            counts = np.array([keys.shape[1]])
            keys = np.pad(keys, ((0, 0), (0, count - keys.shape[1])))
        keys[np.arange(keys.shape[1])[None, :] >= counts[:, None]] = 0
        return keys, counts


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _usearch_version() -> str:
    import usearch

    return str(getattr(usearch, "__version__", "unknown"))
