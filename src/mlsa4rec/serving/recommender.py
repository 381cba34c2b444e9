"""Recommend for new histories with a trained run, in the dataset's own item ids.

    rec = Recommender.from_run("runs/mamba4rec-beauty")
    rec.recommend([["B0001", "B0042"], ["B0007"]], k=10)      # per history: [Recommendation(item, score)]
    session = rec.session(); session.add("B0001"); session.recommend(k=5)

``recommend`` scores a history exactly as the evaluation scores a test user: the last
``max_seq_length`` items (``MAX_ITEM_LIST_LENGTH``), right-padded as in evaluation (trimmed for padding-invariant
models, to the full L for the faithful MLSA4Rec, whose output depends on its padding), full
ranking over every item. A session of a model that streams (``model.streams``: Mamba4Rec, the
causal MLSA4Rec, GRU4Rec, LRURec, and LinRec/Performer up to L events) keeps a constant-size state
per user, so an event costs the same whatever came before; other models re-encode the session's
last L events.

The top k is exact and found ``score_chunk`` items at a time (``ops.ranking.top_items``): memory per
call is B x ``score_chunk`` scores, never B x n_items, and the exclusions (the history with
``exclude_seen``, the ``exclude`` ids) are applied inside each chunk. A catalog of at most
``score_chunk`` items is one product, the very one ``full_sort_scores`` computes, so its scores are
the evaluation's bit for bit. Among equal scores the lower model id comes first. With
``ann='hnsw'`` an approximate index (``serving.ann``, usearch) proposes candidates instead, which are
scored exactly; see ``docs/serving.md`` for its recall.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils import _pytree as pytree

from mlsa4rec.config import Config
from mlsa4rec.data.itemmap import ItemMap
from mlsa4rec.errors import BrokenModelError, MLSA4RecError, check_choice
from mlsa4rec.ops.ranking import top_items, top_scores
from mlsa4rec.runs.loading import load_run
from mlsa4rec.settings import TrainConfig

log = logging.getLogger("mlsa4rec")

UNKNOWN = ("error", "drop")
FALLBACKS = (None, "popular")
# items scored at once by recommend, sessions and the HTTP service (B x this x 4 bytes): evaluation's width, so
# a served catalog up to it is scored as evaluation scores it
SCORE_CHUNK: int = TrainConfig.eval_item_chunk
ANN = (None, "hnsw")

# How messages spell a setting for whoever reads them: Python keywords (``unknown='drop'``), command
# line flags (``--unknown drop``: ``mlsa4rec recommend``/``serve`` set "cli"), JSON fields
# (``"unknown": "drop"``: the HTTP service sets "json" for bodies) or query parameters (``unknown=drop``).
STYLES = ("python", "cli", "json", "query")
_STYLE: contextvars.ContextVar[str] = contextvars.ContextVar("mlsa4rec_option_style", default="python")
_CLI_FLAGS = {"k": "-k", "session_ttl_s": "--session-ttl"}  # the rest: --name-with-dashes


@contextlib.contextmanager
def option_style(style: str) -> Iterator[None]:
    """Within this block, messages name settings as ``style`` (one of ``STYLES``) spells them."""
    check_choice("style", style, STYLES)
    token = _STYLE.set(style)
    try:
        yield
    finally:
        _STYLE.reset(token)


def flag(name: str) -> str:
    """The setting ``name`` as the reader writes it: ``k``, ``-k`` or ``"k"``."""
    style = _STYLE.get()
    if style == "cli":
        return _CLI_FLAGS.get(name, "--" + name.replace("_", "-"))
    return f'"{name}"' if style == "json" else name


def option(name: str, value: Any) -> str:
    """The setting ``name`` set to ``value`` as the reader writes it: ``unknown='drop'``,
    ``--unknown drop``, ``"unknown": "drop"`` or ``unknown=drop``."""
    style = _STYLE.get()
    if style == "cli":
        return f"{flag(name)} {value}"
    if style == "query":
        return f"{name}={value}"
    return f"{flag(name)}: {json.dumps(value)}" if style == "json" else f"{name}={value!r}"


def _is_id(value: Any) -> bool:
    """An item id is a string or an integer (numpy's included), never a bool, float or container."""
    return isinstance(value, (str, numbers.Integral)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """``None``, ``a list``, ``an int``: what a value is, for messages."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _id_list(values: Any, what: str) -> list[Any]:
    """``values`` as a list of item ids, or the error that names ``what`` and the mistake."""
    if isinstance(values, (str, bytes)):
        raise MLSA4RecError(f"{what} must be a list of item ids, not one string ({values!r:.60}); for one id "
                            f"write [{values!r:.60}]")
    if isinstance(values, Mapping) or not isinstance(values, Iterable):
        raise MLSA4RecError(f"{what} must be a list of item ids, got {_kind(values)}")
    items = list(values)
    for value in items:
        if not _is_id(value):
            shown = "" if value is None else f" ({value!r:.60})"
            raise MLSA4RecError(f"{what} holds {_kind(value)}{shown}; an item id is a string or an integer")
    return items


def _shown(ids: Sequence[Any]) -> str:
    return ", ".join(repr(m) for m in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


class Recommendation(NamedTuple):
    item: int | str  # the data file's own item id
    score: float     # the model's score (a training-event count for the popularity fallback)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise MLSA4RecError(f"{flag(name)} must be a whole number of at least 1, got {value!r:.40}")
    return int(value)


class Recommender:
    """A trained model with its item map, ready to score new histories.

    ``score_chunk``: items scored at once when ranking (memory B x this x 4 bytes; a catalog up to it
    is one product, the evaluation's). ``ann='hnsw'``: rank through an approximate nearest-neighbour
    index over the item table (usearch, ``pip install 'mlsa4rec[ann]'``), built now, or loaded from
    ``ann_index`` when that file exists (and saved there when it does not); ``ann_ef``: the index's
    search breadth (recall against latency, default ``serving.ann.EXPANSION_SEARCH``)."""

    def __init__(self, model: torch.nn.Module, config: Config, items: ItemMap, device: torch.device,
                 run_dir: Path | None = None, *, score_chunk: int = SCORE_CHUNK, ann: str | None = None,
                 ann_index: str | Path | None = None, ann_ef: int | None = None) -> None:
        if items.n_items != model.n_items:
            raise MLSA4RecError(f"the item map has {items.n_items} items but the model {model.n_items}")
        self.score_chunk = _positive("score_chunk", score_chunk)
        if ann not in ANN:
            raise MLSA4RecError(f"{flag('ann')} must be None or 'hnsw', got {ann!r:.40}")
        if ann is None and (ann_index is not None or ann_ef is not None):
            raise MLSA4RecError(f"{flag('ann_index' if ann_index is not None else 'ann_ef')} needs "
                                f"{option('ann', 'hnsw')}")
        self.model = model.to(device).eval()
        self.config = config
        self.items = items
        self.device = device
        self.run_dir = run_dir
        self.max_seq_length: int = config.train.max_seq_length  # L: MAX_ITEM_LIST_LENGTH in config.yaml
        self.streams: bool = bool(getattr(model, "streams", False))
        self._step = model.step if self.streams else None
        self.ann, self.ann_index = ann, None if ann_index is None else Path(ann_index)
        self.ann_ef = None if ann_ef is None else _positive("ann_ef", ann_ef)
        self.index = self._index() if ann is not None else None  # serving.ann.ItemIndex

    @property
    def options(self) -> dict[str, Any]:
        """The serving options this recommender was made with (``from_run``'s keywords), for a reload."""
        return {"score_chunk": self.score_chunk, "ann": self.ann, "ann_index": self.ann_index, "ann_ef": self.ann_ef}

    def _index(self) -> Any:
        """The approximate index: loaded from ``ann_index`` when it exists, else built (and saved there)."""
        from mlsa4rec.serving.ann import EXPANSION_SEARCH, ItemIndex, require_usearch

        require_usearch(option("ann", "hnsw"))
        ef = EXPANSION_SEARCH if self.ann_ef is None else self.ann_ef
        if self.ann_index is not None and self.ann_index.exists():
            index = ItemIndex.load(self.ann_index, self.item_table, expansion_search=ef)
            log.info("ann: loaded the item index %s (%d items)", self.ann_index, index.n_items)
            return index
        index = ItemIndex.build(self.item_table, expansion_search=ef)
        log.info("ann: built an HNSW index over %d items in %.1f s (%.0f MB)", index.n_items, index.info["build_s"],
                 index.memory_bytes / 2**20)
        if self.ann_index is not None:
            index.save(self.ann_index)
            log.info("ann: saved it to %s", self.ann_index)
        return index

    @property
    def max_length(self) -> int:
        """Deprecated: ``max_seq_length`` (0.2 named it ``max_length``)."""
        warnings.warn("Recommender.max_length is deprecated; use Recommender.max_seq_length", DeprecationWarning,
                      stacklevel=2)
        return self.max_seq_length

    def compile_step(self) -> bool:
        """Compile the streaming ``step`` with ``torch.compile`` (one fused kernel instead of dozens
        of small ops: about half the cost of an event on a CPU, for some seconds of compiling now).
        Returns whether it worked; without a working compiler the eager step stays, with a warning."""
        if not self.streams:
            return False
        try:
            compiled = torch.compile(self.model.step, dynamic=False)
            with torch.inference_mode():
                state = self.model.initial_state(1, device=self.device)
                item = torch.ones(1, dtype=torch.long, device=self.device)
                got, expected = compiled(item, state)[0], self.model.step(item, state)[0]
            if not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
                raise RuntimeError(f"the compiled step differs from the eager one by "
                                   f"{(got - expected).abs().max().item():.2e}")
        except Exception as exc:  # no C++ compiler, an unsupported op, a wrong result: keep the eager step
            log.warning("the streaming step stays uncompiled (%s)", str(exc).splitlines()[0] if str(exc) else
                        type(exc).__name__)
            return False
        self._step = compiled
        return True

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", data_dir: str | Path | None = None,
                 **options: Any) -> Recommender:
        """Load a finished run (``runs.loading.load_run``): its files are checked against the
        manifest, the weights are safetensors (nothing is unpickled), and the item map comes from
        ``items.json`` (a run without one is rebuilt from its data, which must then be found).
        ``options``: ``score_chunk``, ``ann``, ``ann_index``, ``ann_ef`` (the class's)."""
        run = load_run(run_dir, data_dir, device=device, need_data=False)
        return cls(run.model, run.config, run.items, run.device, run.path, **options)

    # --- ids ---------------------------------------------------------------------------------------
    def to_ids(self, history: Iterable[Any], unknown: str = "error", what: str = "a history") -> list[int]:
        """Model ids of one history of raw ids; unknown ids are an error, or dropped with a warning.
        ``what`` names the list in messages."""
        check_choice(flag("unknown"), unknown, UNKNOWN, MLSA4RecError)
        ids, missing = self.items.ids(_id_list(history, what))
        if missing:
            where = "" if what == "a history" else f" in {what}"
            if unknown == "error":
                raise MLSA4RecError(f"unknown item id(s){where} {_shown(missing)}: the run was not trained on them; "
                                    f"pass {option('unknown', 'drop')} to ignore them")
            log.warning("dropped unknown item id(s)%s %s", where, _shown(missing))
        return ids

    def exclude_ids(self, exclude: Iterable[Any] | None, unknown: str = "error") -> list[int]:
        """Model ids of the raw ids ``exclude`` (None: none), under the same ``unknown`` rule as a
        history: an id the run never saw is an error naming it, or dropped with a warning."""
        return [] if exclude is None else self.to_ids(exclude, unknown, what=flag("exclude"))

    @functools.cached_property
    def state_layout(self) -> tuple[list[tuple[torch.Size, torch.dtype, torch.device]], Any, tuple[int, torch.dtype]]:
        """What a session's saved state must look like for this run (checked on every load): the
        streaming state's leaves (shape, dtype, device) and tree, and the representation's width
        and dtype. Computed once (a served run's model does not change)."""
        leaves, spec = pytree.tree_flatten(self.model.initial_state(1, device=self.device)) if self.streams \
            else ([], None)
        with torch.no_grad():
            table = self.model.item_table()
        return [(t.shape, t.dtype, t.device) for t in leaves], spec, (int(table.shape[1]), table.dtype)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The identity of this run: SHA-256 of the model's name, L, the item ids and every
        weight, so a session state saved by another run (or another training of it) is told apart.
        Computed once, on first use (the weights of a served run do not change)."""
        digest = hashlib.sha256(json.dumps([self.config.model, self.max_seq_length,
                                            [str(t) for t in self.items.tokens]]).encode())
        with torch.no_grad():
            for name, tensor in sorted(self.model.state_dict().items()):
                flat = tensor.detach().cpu().contiguous().reshape(-1)
                digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
                digest.update(flat.view(torch.uint8).numpy())
        return digest.hexdigest()

    # --- scoring -----------------------------------------------------------------------------------
    def batch(self, histories: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded input of model-id histories, as the evaluation builds it: the last L items,
        trimmed to the longest history for a padding-invariant model, the full L otherwise."""
        tails = [list(h)[-self.max_seq_length:] for h in histories]
        if any(not t for t in tails):
            raise MLSA4RecError(f"a history is empty; give at least one item, or use {option('fallback', 'popular')}")
        lengths = [len(t) for t in tails]
        width = max(lengths) if getattr(self.model, "padding_invariant", False) else self.max_seq_length
        seq = np.zeros((len(tails), width), dtype=np.int64)
        for row, tail in enumerate(tails):
            seq[row, :len(tail)] = tail
        return torch.from_numpy(seq).to(self.device), torch.tensor(lengths, device=self.device)

    @torch.inference_mode()
    def scores(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """B x (n_items + 1) full-ranking scores of model-id histories (column 0, padding, is -inf)."""
        item_seq, lengths = self.batch(histories)
        return self.model.full_sort_scores(item_seq, lengths).float()

    @torch.inference_mode()
    def scores_from_state(self, representation: torch.Tensor) -> torch.Tensor:
        """Scores from a streamed B x D representation, as ``full_sort_scores`` computes them."""
        scores = (representation @ self.model.item_table().t()).float()
        scores[:, 0] = float("-inf")
        return scores

    @torch.inference_mode()
    def users(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """B x D representations of model-id histories, padded as ``scores`` pads them: ``full_sort_scores``
        is ``users @ item_table.T`` (column 0 set to -inf). What ``rank`` takes."""
        item_seq, lengths = self.batch(histories)
        return self.model(item_seq, lengths)

    @functools.cached_property
    def item_table(self) -> torch.Tensor:
        """The model's (n_items + 1) x D output table, computed once (a served run's weights do not
        change; a reload makes a new Recommender). For most models it is the embedding itself."""
        with torch.no_grad():
            return self.model.item_table().detach()

    def _broken(self, row: int) -> BrokenModelError:
        return BrokenModelError(f"the model scored history {row} with NaN or infinite values: its weights or the "
                                "session state it was given are broken; reload the run (and the session) or retrain it")

    def rank(self, users: torch.Tensor, k: int | Sequence[int], seen: Sequence[Iterable[int]] | None = None,
             exclude: Iterable[Any] | None = (), unknown: str = "error") -> list[list[Recommendation]]:
        """The ``k`` best items for each of the B x D ``users`` (``users``, a session's
        representation), minus the row's ``seen`` ids and the raw ids ``exclude`` (the ``unknown``
        rule): what ``top_k(scores(...))`` gives, without the B x n_items scores (class docstring).
        ``k``: one for every row, or one per row."""
        banned = self.exclude_ids(exclude, unknown)
        seen = list(seen or [])
        return self.rank_ids(users, k, [[*banned, *(seen[row] if row < len(seen) else ())]
                                        for row in range(users.shape[0])])

    @torch.inference_mode()
    def rank_ids(self, users: torch.Tensor, k: int | Sequence[int],
                 excluded: Sequence[Iterable[int]] | None = None) -> list[list[Recommendation]]:
        """``rank`` with each row's exclusions given as model ids (``excluded[row]``; none past its end)."""
        batch = users.shape[0]
        ks = [k] * batch if isinstance(k, numbers.Integral) else [int(x) for x in k]
        if len(ks) != batch:
            raise MLSA4RecError(f"one k per row: {batch} rows, {len(ks)} values of k")
        if not batch:
            return []
        sets = [np.unique(np.fromiter(ids, dtype=np.int64)) for ids in (excluded or [])]
        sets += [np.zeros(0, dtype=np.int64)] * (batch - len(sets))
        if self.index is not None:
            ids, values = self._approximate(users, max(ks), sets)
        else:
            ids, values = top_items(users, self.item_table, max(ks), self.score_chunk, _pairs(sets, users.device),
                                    broken=self._broken)
        return [[Recommendation(self.items.token(i), v) for i, v in zip(row_ids[:n], row_values[:n])
                 if v > float("-inf")] for n, row_ids, row_values in zip(ks, ids.tolist(), values.tolist())]

    def _approximate(self, users: torch.Tensor, k: int, sets: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """``top_items`` through the approximate index: k + (the row's exclusions) candidates per row,
        scored exactly against the item table, the exclusions dropped; a row left with fewer than it
        needs is ranked exactly instead."""
        n, table = self.items.n_items, self.item_table
        bad = ~torch.isfinite(users).all(dim=1)
        if bool(bad.any()):
            raise self._broken(int(bad.nonzero()[0]))
        real = [s[(s >= 1) & (s <= n)] for s in sets]
        keys, _ = self.index.search(users, k + max(len(s) for s in real))
        for row, s in enumerate(real):
            if len(s):
                keys[row, np.isin(keys[row], s)] = 0
        candidates = torch.from_numpy(keys).to(users.device)
        scores = torch.bmm(table[candidates], users[:, :, None]).squeeze(2).float()
        bad = (~torch.isfinite(scores) & (candidates > 0)).any(dim=1)
        if bool(bad.any()):
            raise self._broken(int(bad.nonzero()[0]))
        scores[candidates == 0] = float("-inf")
        ids, values = top_scores(scores, k, candidates)
        need = torch.tensor([min(k, n - len(s)) for s in real], device=users.device)
        short = ((values > float("-inf")).sum(dim=1) < need).nonzero().squeeze(1).tolist()
        if short:  # too few candidates left (a small catalog, long exclusions): those rows exactly
            exact_ids, exact_values = top_items(users[short], table, k, self.score_chunk,
                                                _pairs([sets[row] for row in short], users.device),
                                                broken=lambda row: self._broken(short[row]))
            ids[short], values[short] = exact_ids, exact_values
        return ids, values

    def top_k(self, scores: torch.Tensor, k: int, seen: Sequence[Iterable[int]] | None = None,
              exclude: Iterable[Any] | None = (), unknown: str = "error") -> list[list[Recommendation]]:
        """The ``k`` best items of each row, minus the row's ``seen`` ids and the raw ids ``exclude``
        (an id the run never saw is an error, or dropped with ``unknown='drop'``)."""
        banned = self.exclude_ids(exclude, unknown)
        broken = ~torch.isfinite(scores[:, 1:])  # real items; column 0 (padding) is -inf by design
        if bool(broken.any()):  # never an empty or arbitrary list in their place
            raise self._broken(int(broken.any(dim=1).nonzero()[0]))
        scores = scores.clone()  # the padding column is -inf already; exclusions below write into a copy
        if banned:
            scores[:, banned] = float("-inf")
        for row, ids in enumerate(seen or []):
            ids = list(ids)
            if ids:
                scores[row, ids] = float("-inf")
        index, values = top_scores(scores[:, 1:], min(k, scores.shape[1] - 1), 1)  # the lower id first among ties
        return [[Recommendation(self.items.token(int(i)), float(v)) for v, i in zip(vs, ix) if v > float("-inf")]
                for vs, ix in zip(values.tolist(), index.tolist())]

    def popular(self, k: int, skip: Iterable[int] = (), exclude: Iterable[Any] | None = (),
                unknown: str = "error") -> list[Recommendation]:
        """The ``k`` items with the most training events, minus the model ids ``skip`` and the raw ids
        ``exclude`` (under the ``unknown`` rule); their score is that count."""
        banned = set(skip) | set(self.exclude_ids(exclude, unknown))
        return [Recommendation(self.items.token(i), float(self.items.counts[i - 1]))
                for i in self.items.most_popular(k, sorted(banned))]

    def check_k(self, k: int, name: str | None = None) -> None:
        """Refuse a ``k`` that is not a whole number from 1 to the items the run knows; ``name``
        names it in the message (default: the ``k`` setting, as the reader spells it)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.items.n_items:
            raise MLSA4RecError(f"{name or flag('k')} must be a whole number from 1 to {self.items.n_items} (the "
                                f"items this run knows), got {k!r:.40}")

    def recommend(self, histories: Sequence[Sequence[Any]], k: int = 10, exclude_seen: bool = False,
                  exclude: Iterable[Any] | None = None, unknown: str = "error",
                  fallback: str | None = None) -> list[list[Recommendation]]:
        """Top-``k`` items (raw ids, best first) for each history of raw ids.

        ``exclude_seen`` removes the history's items, ``exclude`` any raw ids; ``unknown='drop'``
        ignores ids the run never saw (with a warning) instead of failing; an empty history is an
        error, or gets the most popular training items with ``fallback='popular'``.
        """
        self.check_k(k)
        if fallback not in FALLBACKS:
            raise MLSA4RecError(f"{flag('fallback')} must be None or 'popular', got {fallback!r}")
        if isinstance(histories, (str, bytes, Mapping)) or not isinstance(histories, Iterable):
            raise MLSA4RecError("histories must be a list of lists of item ids")
        histories = list(histories)
        if not all(isinstance(h, Sequence) and not isinstance(h, (str, bytes)) for h in histories):
            raise MLSA4RecError("histories must be a list of lists of item ids")
        ids = [self.to_ids(h, unknown) for h in histories]
        exclude = [self.items.token(i) for i in self.exclude_ids(exclude, unknown)]  # checked (and warned) once
        out: list[list[Recommendation]] = [[] for _ in ids]
        filled = [i for i, h in enumerate(ids) if h]
        for i, h in enumerate(ids):
            if not h:
                if fallback != "popular":
                    raise MLSA4RecError(f"history {i} is empty{' after dropping unknown ids' if histories[i] else ''}"
                                        f"; give at least one item, or use {option('fallback', 'popular')}")
                out[i] = self.popular(k, exclude=exclude)
        if filled:
            scored = self.rank(self.users([ids[i] for i in filled]), k,
                               [ids[i] for i in filled] if exclude_seen else None, exclude)
            for i, recs in zip(filled, scored):
                out[i] = recs
        return out

    def session(self) -> Session:
        return Session(self)


class Session:
    """One user's live history. ``add`` feeds an event; ``recommend`` ranks what comes next.

    For a model that streams, the session holds the model's constant-size state and the
    representation after the last event, so ``add`` costs one step whatever the history's
    length; the state covers the whole session (it is not cut to L), except for a model whose
    state ends at ``stream_limit`` events (learned positions), which then re-encodes. Otherwise
    the session keeps its last L events and ``recommend`` re-encodes them. Either way ``seen`` keeps every id added,
    for ``exclude_seen``.
    """

    _FORMAT = 2  # 2 adds "run", the fingerprint of the run that saved it; 1 (mlsa4rec 0.2.0) is still read

    def __init__(self, rec: Recommender) -> None:
        self.rec = rec
        self.length = 0
        self.recent: list[int] = []  # the last L model ids
        self.seen: set[int] = set()
        self.state = rec.model.initial_state(1, device=rec.device) if rec.streams else None
        self.representation: torch.Tensor | None = None

    def add(self, item: Any, unknown: str = "error") -> bool:
        """Add one event (a raw id); False when ``unknown='drop'`` dropped it."""
        if not _is_id(item):
            several = isinstance(item, Iterable) and not isinstance(item, (str, bytes, Mapping))
            raise MLSA4RecError(f"Session.add takes one item id (a string or an integer), got {_kind(item)}"
                                + ("; for several events use Session.add_many(items)" if several else ""))
        ids = self.rec.to_ids([item], unknown)
        self.add_ids(ids)
        return bool(ids)

    def add_many(self, items: Iterable[Any], unknown: str = "error") -> int:
        """Add several events (raw ids, oldest first); returns how many were added (``unknown='drop'``
        drops the ids the run never saw, with a warning). Nothing is added when an id is refused."""
        ids = self.rec.to_ids(items, unknown, what="Session.add_many's items")
        self.add_ids(ids)
        return len(ids)

    @torch.inference_mode()
    def add_ids(self, item_ids: Iterable[int]) -> None:
        """Add events given as model ids (1..n_items), one ``step`` each for a streaming model."""
        limit = getattr(self.rec.model, "stream_limit", None)
        for item_id in item_ids:
            if self.state is not None and limit is not None and self.length >= limit:
                # learned positions end here: from now on re-encode the last L events, as the batch path does
                self.state = self.representation = None
            if self.state is not None:
                self.representation, self.state = self.rec._step(torch.tensor([item_id], device=self.rec.device),
                                                                 self.state)
            self.recent = (self.recent + [item_id])[-self.rec.max_seq_length:]
            self.seen.add(item_id)
            self.length += 1

    def scores(self) -> torch.Tensor:
        """1 x (n_items + 1) scores after the events so far."""
        if not self.length:
            raise MLSA4RecError(f"the session has no events yet; add one first, or use {option('fallback', 'popular')}")
        if self.representation is not None:
            return self.rec.scores_from_state(self.representation)
        return self.rec.scores([self.recent])

    def users(self) -> torch.Tensor:
        """1 x D: the representation after the events so far (``scores`` is it times the item table)."""
        if not self.length:
            raise MLSA4RecError(f"the session has no events yet; add one first, or use {option('fallback', 'popular')}")
        if self.representation is not None:
            return self.representation
        return self.rec.users([self.recent])

    def recommend(self, k: int = 10, exclude_seen: bool = False, exclude: Iterable[Any] | None = None,
                  fallback: str | None = None, unknown: str = "error") -> list[Recommendation]:
        """The ``k`` best next items; ``exclude`` raw ids follow the ``unknown`` rule (an error naming an
        id the run never saw, or dropped with ``unknown='drop'``), as histories do."""
        self.rec.check_k(k)
        if fallback not in FALLBACKS:
            raise MLSA4RecError(f"{flag('fallback')} must be None or 'popular', got {fallback!r}")
        exclude = [self.rec.items.token(i) for i in self.rec.exclude_ids(exclude, unknown)]
        if not self.length and fallback == "popular":
            return self.rec.popular(k, exclude=exclude)
        return self.rec.rank(self.users(), k, [self.seen] if exclude_seen else None, exclude)[0]

    @classmethod
    def from_events(cls, rec: Recommender, recent: Iterable[Any], seen: Iterable[Any], length: int) -> Session:
        """A session of ``rec`` continued from another run's: its last L events (raw ids) re-encoded by
        ``rec`` (for a streaming model, stepped through from an empty state: the batch path on those
        items), its seen items and its length kept; ids ``rec`` does not know are dropped. What a
        session made by another run (before a reload, or by a replica serving another run) becomes,
        rather than its state read by the wrong weights."""
        session = cls(rec)
        known, _ = rec.items.ids(_id_list(list(recent), "the session's recent items"))
        session.add_ids(known[-rec.max_seq_length:])
        session.seen = set(rec.items.ids(_id_list(list(seen), "the session's seen items"))[0]) | session.seen
        session.length = max(int(length), session.length)
        limit = getattr(rec.model, "stream_limit", None)
        if session.state is not None and limit is not None and session.length > limit:
            session.state = session.representation = None  # past the learned positions: re-encoded from now on
        return session

    def rebased(self, rec: Recommender) -> Session:
        """This session continued by ``rec`` (``from_events`` on its own events)."""
        return Session.from_events(rec, [self.rec.items.token(i) for i in self.recent],
                                   [self.rec.items.token(i) for i in self.seen], self.length)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this session after a restart: plain values and tensors
        (save it with ``torch.save`` and load it with ``torch.load(weights_only=True)``). ``run`` is
        the fingerprint of the run (``Recommender.fingerprint``), checked when it is loaded."""
        leaves = pytree.tree_leaves(self.state) if self.state is not None else []
        return {"format": self._FORMAT, "run": self.rec.fingerprint, "model": self.rec.config.model,
                "length": self.length,
                "recent": [self.rec.items.token(i) for i in self.recent],
                "seen": [self.rec.items.token(i) for i in sorted(self.seen)],
                "state": [t.detach().cpu() for t in leaves],
                "representation": None if self.representation is None else self.representation.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the session saved by ``state_dict`` of the same run. Everything is checked before
        the session changes: a state of another run or model, or one whose values, tensor shapes,
        dtypes or numbers (NaN) do not fit, is an ``MLSA4RecError`` naming what is wrong."""
        rec = self.rec
        if not isinstance(state, Mapping):
            raise _bad_state(f"it is {_kind(state)}, not a dict")
        version = state.get("format")
        if type(version) is not int or version not in (1, self._FORMAT):
            raise _bad_state(f"its format is {version!r:.40}; this mlsa4rec reads formats 1 and {self._FORMAT}")
        keys = ["run", "model", "length", "recent", "seen", "state", "representation"][version == 1:]
        missing = [key for key in keys if key not in state]
        if missing:
            raise _bad_state(f"it lacks {', '.join(missing)}")
        if not isinstance(state["model"], str) or state["model"] != rec.config.model:
            raise MLSA4RecError(f"the session was saved by a {state['model']!r:.60} model, not "
                                f"{rec.config.model!r}; load it into a Recommender of the run that saved it")
        if version == 1:
            log.warning("the session state was saved by mlsa4rec 0.2.0, without its run's fingerprint: its form is "
                        "checked, not that this run saved it")
        elif not isinstance(state["run"], str) or state["run"] != rec.fingerprint:
            raise MLSA4RecError("the session was saved by another run (its weights or items differ from this one's); "
                                "load it into a Recommender of the run that saved it")
        length = state["length"]
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
            raise _bad_state(f"'length' must be a whole number of at least 0, got {length!r:.40}")
        length = int(length)
        recent, seen = self._saved_ids(state["recent"], "recent"), self._saved_ids(state["seen"], "seen")
        # fewer recent items than events is allowed: a session re-encoded by another run keeps only the
        # events that run knows (Session.from_events), and a run with a larger L sees only what was kept
        if len(recent) > min(length, rec.max_seq_length) or len(set(seen)) != len(seen) or len(seen) > length \
                or not set(recent) <= set(seen):
            raise _bad_state(f"its {length} events, {len(recent)} recent and {len(seen)} seen items do not agree")
        new_state, representation = self._saved_model_state(state["state"], state["representation"], length)
        self.state, self.representation = new_state, representation
        self.length = length
        self.recent = recent
        self.seen = set(seen)

    def _saved_ids(self, values: Any, key: str) -> list[int]:
        items = _id_list(values, f"the session state's {key!r}")
        ids, missing = self.rec.items.ids(items)
        if missing:
            raise MLSA4RecError(f"the session state's {key!r} names item id(s) {_shown(missing)} that this run does "
                                "not know; load it into a Recommender of the run that saved it")
        return ids

    def _saved_model_state(self, saved: Any, representation: Any, length: int) -> tuple[Any, torch.Tensor | None]:
        """The streaming state and representation to continue from, checked against a fresh state."""
        rec = self.rec
        if not isinstance(saved, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in saved):
            raise _bad_state(f"'state' must be a list of tensors, got {_kind(saved)}")
        if representation is not None and not isinstance(representation, torch.Tensor):
            raise _bad_state(f"'representation' must be a tensor or None, got {_kind(representation)}")
        limit = getattr(rec.model, "stream_limit", None)
        if not rec.streams or (limit is not None and length > limit):  # re-encodes: no model state
            if saved or representation is not None:
                raise _bad_state("it holds a model state, but this model re-encodes " + (
                    "its sessions" if not rec.streams else f"a session past {limit} events"))
            return None, None
        leaves, spec, (width, table_dtype) = rec.state_layout
        if len(saved) != len(leaves):
            raise _bad_state(f"its model state has {len(saved)} tensors, this model's {len(leaves)}")
        restored = []
        for i, (tensor, (shape, dtype, device)) in enumerate(zip(saved, leaves)):
            if tensor.shape != shape or tensor.dtype != dtype:
                raise _bad_state(f"state tensor {i} is {tuple(tensor.shape)} {tensor.dtype}, this model's "
                                 f"{tuple(shape)} {dtype}")
            if _bad_numbers(tensor):
                raise _bad_state(f"state tensor {i} holds NaN or infinite numbers")
            restored.append(tensor.detach().to(device=device, copy=True))
        if length == 0:
            if representation is not None:
                raise _bad_state("it has a representation but no events")
            return pytree.tree_unflatten(restored, spec), None
        if representation is None or representation.shape != (1, width) or representation.dtype != table_dtype:
            got = "None" if representation is None else f"{tuple(representation.shape)} {representation.dtype}"
            raise _bad_state(f"its representation is {got}, this model's (1, {width}) {table_dtype}")
        if _bad_numbers(representation, empty_sum=False):
            raise _bad_state("its representation holds NaN or infinite numbers")
        return pytree.tree_unflatten(restored, spec), representation.detach().to(device=rec.device, copy=True)


def _pairs(sets: Sequence[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's excluded model ids as ``(rows, items)`` pairs for ``ops.ranking.top_items``."""
    if not any(len(s) for s in sets):
        return None
    rows = np.concatenate([np.full(len(s), row, dtype=np.int64) for row, s in enumerate(sets)])
    items = np.concatenate(sets)
    return torch.from_numpy(rows).to(device), torch.from_numpy(items).to(device)


def _bad_numbers(tensor: torch.Tensor, empty_sum: bool = True) -> bool:
    """NaN or +inf in ``tensor`` (and -inf unless ``empty_sum``: a running log-sum of nothing is -inf),
    by one reduction for real tensors: NaN and +inf propagate to the maximum."""
    if tensor.is_complex():
        return not bool(torch.isfinite(tensor).all())
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    high = tensor.max()
    if bool(torch.isnan(high)) or bool(torch.isposinf(high)):
        return True
    return not empty_sum and bool(torch.isneginf(tensor.min()))


def _bad_state(reason: str) -> MLSA4RecError:
    return MLSA4RecError(f"the session state cannot be used: {reason}; load only what Session.state_dict() of this "
                         "run returned (torch.load(f, weights_only=True))")
