"""From raw interactions to the protocol's per-user sequences and leave-one-out split.

Steps, as in RecBole 1.2's sequential pipeline (``MLSA4REC.md`` section 5):

1. iterative k-core: drop users and items whose event counts fall outside the intervals,
   counting both on the current data and dropping both at once, until nothing changes;
2. remap ids to 1..N in order of first appearance in the file (RecBole's ``factorize``); 0 = pad;
3. sort each user's events by time, stably (ties keep file order);
4. leave-one-out on the user's prefix samples, with RecBole's rule for short users: a user with
   n events has n - 1 samples (targets at positions 1..n-1); the last is test, the one before is
   validation, the rest train; with only 2 samples there is no validation target, with 1 sample
   it is a training sample.

Everything is stored as one flat array of item ids (users' sequences back to back) plus offsets,
so that every sample is "the items before flat index t" and batches are built by vectorised
gathers. The processed arrays are cached on disk, keyed by the file's checksum and the settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlsa4rec.config import parse_interval
from mlsa4rec.data.readers import Interactions, read_interactions
from mlsa4rec.errors import DataError
from mlsa4rec.fileio import atomic_path, sha256_file

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = "[5,inf)"  # the protocol's 5-core filter, RecBole's notation
PROCESSING_VERSION = 1  # bump when the processing below changes what it produces


@dataclass
class SequenceData:
    """Chronological item sequences of every user after filtering and remapping."""

    name: str
    items: np.ndarray        # int64, all users' item ids back to back
    offsets: np.ndarray      # int64, n_users + 1; user u owns items[offsets[u]:offsets[u+1]]
    item_tokens: np.ndarray  # raw token of each item id; index 0 is the padding placeholder
    user_tokens: np.ndarray  # raw token of each user index
    fingerprint: str         # checksum of the source file + processing settings
    source: str = ""         # the file it was read from and its reader (set on load, not cached)

    @property
    def n_users(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def n_items(self) -> int:
        """Real items; ids run 1..n_items and 0 is padding."""
        return int(self.item_tokens.shape[0] - 1)

    @property
    def n_interactions(self) -> int:
        return int(self.items.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def stats(self) -> dict[str, float | int | str]:
        lengths = self.lengths
        return {
            "dataset": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "mean_length": round(float(lengths.mean()), 4),
            "median_length": float(np.median(lengths)),
            "min_length": int(lengths.min()),
            "max_length": int(lengths.max()),
            "density": round(self.n_interactions / (self.n_users * self.n_items), 6),
        }

    # --- leave-one-out split -------------------------------------------------------------------
    def _split_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Per user: number of samples (n - 1) and how many are held out (0, 1 or 2)."""
        samples = np.maximum(self.lengths - 1, 0)
        held_out = np.clip(samples - 1, 0, 2)
        return samples, held_out

    def train_target_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per user, the flat half-open range [first, end) of training targets."""
        samples, held_out = self._split_counts()
        first = self.offsets[:-1] + 1
        end = first + np.maximum(samples - held_out, 0)
        return first, end

    def train_targets(self) -> np.ndarray:
        """Flat index of every training target (one prefix sample each), user by user."""
        first, end = self.train_target_range()
        n = end - first
        starts = np.repeat(first - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
        return starts + np.arange(int(n.sum()))

    def eval_targets(self, split: str) -> np.ndarray:
        """Flat index of the target of each user that has one in ``split`` ('valid' or 'test')."""
        _, held_out = self._split_counts()
        last = self.offsets[1:] - 1
        if split == "test":
            return last[held_out >= 1]
        if split == "valid":
            return last[held_out == 2] - 1
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def history_start(self, targets: np.ndarray) -> np.ndarray:
        """Flat index where the history of each target begins (its user's first event)."""
        users = np.searchsorted(self.offsets, targets, side="right") - 1
        return self.offsets[users]


def kcore_filter(user_codes: np.ndarray, item_codes: np.ndarray, user_interval: str, item_interval: str) -> np.ndarray:
    """Boolean mask of the events that survive iterative filtering by interaction counts."""
    u_lo, u_hi = parse_interval(user_interval, "user_inter_num_interval")
    i_lo, i_hi = parse_interval(item_interval, "item_inter_num_interval")
    keep = np.ones(user_codes.shape[0], dtype=bool)
    n_users, n_items = int(user_codes.max()) + 1, int(item_codes.max()) + 1
    while True:
        u_cnt = np.bincount(user_codes[keep], minlength=n_users)
        i_cnt = np.bincount(item_codes[keep], minlength=n_items)
        ok_u = (u_cnt >= u_lo) & (u_cnt <= u_hi)
        ok_i = (i_cnt >= i_lo) & (i_cnt <= i_hi)
        new_keep = keep & ok_u[user_codes] & ok_i[item_codes]
        if new_keep.sum() == keep.sum():
            return keep
        keep = new_keep


def build_sequences(
    inter: Interactions,
    name: str,
    user_interval: str = DEFAULT_INTERVAL,
    item_interval: str = DEFAULT_INTERVAL,
    fingerprint: str = "",
) -> SequenceData:
    """Filter, remap, sort: the whole pipeline from events to per-user sequences (vectorised)."""
    if len(inter) == 0:
        raise DataError(f"{name}: the file holds no interactions")
    user_codes, _ = pd.factorize(inter.user)
    item_codes, _ = pd.factorize(inter.item)
    keep = kcore_filter(user_codes, item_codes, user_interval, item_interval)
    if not keep.any():
        raise DataError(
            f"{name}: filtering with user_inter_num_interval={user_interval} and "
            f"item_inter_num_interval={item_interval} leaves no interactions; loosen them, e.g. "
            "--set user_inter_num_interval='[0,inf)' --set item_inter_num_interval='[0,inf)'"
        )
    users_raw, items_raw, times = inter.user[keep], inter.item[keep], inter.time[keep]
    user_ids, user_tokens = pd.factorize(users_raw)       # 0-based, first appearance
    item_ids, item_tokens = pd.factorize(items_raw)
    item_ids = item_ids + 1                               # 0 is padding
    order = np.lexsort((np.arange(user_ids.shape[0]), times, user_ids))  # stable by construction
    counts = np.bincount(user_ids, minlength=len(user_tokens))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    item_tok, user_tok = _token_array(np.asarray(item_tokens)), _token_array(np.asarray(user_tokens))
    pad = np.zeros(1, dtype=np.int64) if item_tok.dtype.kind == "i" else np.array(["[PAD]"])
    return SequenceData(
        name=name,
        items=item_ids[order].astype(np.int64),
        offsets=offsets,
        item_tokens=np.concatenate([pad, item_tok]),
        user_tokens=user_tok,
        fingerprint=fingerprint,
    )


# --- on-disk cache ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$MLSA4REC_CACHE_DIR``, else ``~/.cache/mlsa4rec``."""
    env = os.environ.get("MLSA4REC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mlsa4rec"


def _token_array(a: np.ndarray) -> np.ndarray:
    """Tokens as a pickle-free array: int64 if they are integers, else fixed-width unicode."""
    return a.astype(np.int64) if a.dtype.kind in "iu" else a.astype(str)


def save_cached(data: SequenceData, path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh, items=data.items, offsets=data.offsets,
                item_tokens=data.item_tokens, user_tokens=data.user_tokens,
                meta=np.array([data.name, data.fingerprint]),
            )


def load_cached(path: Path) -> SequenceData | None:
    """The cached dataset, or None if it is missing or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            name, fingerprint = (str(x) for x in z["meta"])
            return SequenceData(name, z["items"], z["offsets"], z["item_tokens"], z["user_tokens"], fingerprint)
    except Exception as exc:  # a corrupt cache is not the user's problem: rebuild it
        log.warning("ignoring unreadable dataset cache %s (%s); rebuilding", path, exc)
        return None


def load_sequences(
    path: str | Path,
    fmt: str,
    name: str,
    user_interval: str = DEFAULT_INTERVAL,
    item_interval: str = DEFAULT_INTERVAL,
    use_cache: bool = True,
) -> SequenceData:
    """Read ``path`` with reader ``fmt`` and process it, through the checksum-keyed cache."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    t0 = time.perf_counter()
    digest = sha256_file(path)
    key = f"v{PROCESSING_VERSION}-{fmt}-{digest}-{user_interval}-{item_interval}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:20]
    cache_file = cache_dir() / "processed" / f"{name}-{fingerprint}.npz"
    if use_cache and (cached := load_cached(cache_file)) is not None:
        log.info("loaded %s from cache %s in %.2f s", name, cache_file, time.perf_counter() - t0)
        cached.source = f"{path.resolve()} ({fmt})"
        return cached
    data = build_sequences(read_interactions(path, fmt), name, user_interval, item_interval, fingerprint)
    data.source = f"{path.resolve()} ({fmt})"
    if use_cache:
        try:
            save_cached(data, cache_file)
        except OSError as exc:
            log.warning("could not write dataset cache %s (%s); continuing without it", cache_file, exc)
    log.info("built %s from %s in %.2f s", name, path, time.perf_counter() - t0)
    return data
