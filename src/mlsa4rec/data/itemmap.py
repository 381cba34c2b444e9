"""The dataset's own item ids beside the model's: what serving needs to speak a user's language.

A model sees item ids 1..N (0 is padding); people and systems know the tokens of their data file
(``i5`` in an ``.inter`` file, MovieLens MovieIDs). A run directory keeps this map in
``items.json`` together with each item's training popularity (the fallback for an empty history),
so a trained model can be served without the data file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlsa4rec.data.dataset import SequenceData
from mlsa4rec.errors import MLSA4RecError

FILE = "items.json"
_FORMAT = 1


@dataclass
class ItemMap:
    """``tokens[i - 1]`` is the raw token of model id i; ``counts[i - 1]`` its training events."""

    tokens: list[int | str]
    counts: np.ndarray
    _ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.counts):
            raise MLSA4RecError(f"{FILE} is inconsistent: {len(self.tokens)} tokens but {len(self.counts)} counts")
        # tokens are looked up by their text, so 5, "5" and np.int64(5) name the same item
        self._ids = {str(token): i + 1 for i, token in enumerate(self.tokens)}
        if len(self._ids) != len(self.tokens):
            raise MLSA4RecError(f"{FILE} names an item twice; the run directory is damaged")

    @property
    def n_items(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_data(cls, data: SequenceData) -> ItemMap:
        """The map of a processed dataset; popularity counts the events training saw
        (``SequenceData.training_counts``: every event but the held-out targets, or those before
        valid_time under a time split)."""
        counts = data.training_counts()
        return cls([t.item() if isinstance(t, np.generic) else t for t in data.item_tokens[1:]], counts[1:])

    def to_json(self) -> dict[str, Any]:
        return {"format": _FORMAT, "tokens": self.tokens, "train_counts": self.counts.tolist()}

    @classmethod
    def from_json(cls, obj: Any) -> ItemMap:
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT or not isinstance(obj.get("tokens"), list):
            raise MLSA4RecError(f"{FILE} is not an mlsa4rec item map (format {_FORMAT}); train the run again")
        return cls(obj["tokens"], np.asarray(obj.get("train_counts", []), dtype=np.int64))

    def id_of(self, token: Any) -> int | None:
        """The model id of a raw token (None when the run never saw it)."""
        return self._ids.get(str(token))

    def ids(self, tokens: Iterable[Any]) -> tuple[list[int], list[Any]]:
        """Model ids of ``tokens`` in order, and the tokens the run does not know."""
        known, unknown = [], []
        for token in tokens:
            i = self._ids.get(str(token))
            (known if i is not None else unknown).append(i if i is not None else token)
        return known, unknown

    def token(self, item_id: int) -> int | str:
        return self.tokens[item_id - 1]

    def most_popular(self, k: int, skip: Sequence[int] = ()) -> list[int]:
        """The ``k`` model ids with the most training events (ties: lower id first), minus ``skip``."""
        order = np.argsort(-self.counts, kind="stable") + 1
        skipped = set(skip)
        return [int(i) for i in order if int(i) not in skipped][:k]
