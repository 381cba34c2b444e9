"""The processed dataset written out as Parquet: what training sees, for other tools and for checks.

One row per event after filtering, user by user in chronological order. ``user_id`` and ``item_id``
are the file's own tokens and ``timestamp`` its seconds (where the file has times), so the export is
itself a data file ``read_parquet`` takes back: prepared again with the same filters it gives the same
sequences. Beside them: the internal ids (``user_index``: 0-based, ``item_index``: 1..n_items, 0
being padding), the event's ``position`` in its user's sequence, and its ``role`` under the split:
``train`` (a training target), ``valid`` or ``test`` (the user's target there), or ``context`` (only
ever history: a user's first event and, under a time split, events no split takes as a target).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlsa4rec.data.dataset import SequenceData
from mlsa4rec.fileio import atomic_path

ROLES = ("context", "train", "valid", "test")


def event_roles(data: SequenceData) -> np.ndarray:
    """int8 per event: an index into :data:`ROLES`."""
    roles = np.zeros(data.n_interactions, dtype=np.int8)
    roles[data.train_targets()] = 1
    roles[data.eval_targets("valid")] = 2
    roles[data.eval_targets("test")] = 3
    return roles


def write_parquet(data: SequenceData, path: str | Path) -> Path:
    """Write ``data`` to ``path`` (a temporary file renamed into place: a failed write leaves nothing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lengths = data.lengths
    users = np.repeat(np.arange(data.n_users, dtype=np.int32), lengths)
    position = np.arange(data.n_interactions, dtype=np.int64) - np.repeat(data.offsets[:-1], lengths)
    columns = {
        "user_id": pa.array(data.user_tokens[users]),
        "item_id": pa.array(data.item_tokens[data.items]),
        **({"timestamp": pa.array(data.times, type=pa.float64())} if data.timed and data.times is not None else {}),
        "user_index": pa.array(users),
        "item_index": pa.array(data.items.astype(np.int32)),
        "position": pa.array(position.astype(np.int32)),
        "role": pa.DictionaryArray.from_arrays(pa.array(event_roles(data)), pa.array(ROLES)),
    }
    table = pa.table(columns)
    meta = {b"mlsa4rec.dataset": data.name.encode(), b"mlsa4rec.fingerprint": data.fingerprint.encode(),
            b"mlsa4rec.split": data.split.describe().encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
