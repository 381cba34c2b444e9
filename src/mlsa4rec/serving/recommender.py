"""Recommend for new histories with a trained run, in the dataset's own item ids.

    rec = Recommender.from_run("runs/mamba4rec-beauty")
    rec.recommend([["B0001", "B0042"], ["B0007"]], k=10)      # per history: [Recommendation(item, score)]
    session = rec.session(); session.add("B0001"); session.recommend(k=5)

``recommend`` scores a history exactly as the evaluation scores a test user: the last
``MAX_ITEM_LIST_LENGTH`` items, right-padded as in evaluation (trimmed for padding-invariant
models, to the full L for the faithful MLSA4Rec, whose output depends on its padding), full
ranking over every item. A session of a model that streams (``model.streams``: Mamba4Rec, the
causal MLSA4Rec, GRU4Rec, LRURec, and LinRec/Performer up to L events) keeps a constant-size state
per user, so an event costs the same whatever came before; other models re-encode the session's
last L events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils import _pytree as pytree

from mlsa4rec.config import Config, build_config, load_yaml_file
from mlsa4rec.data.itemmap import ItemMap
from mlsa4rec.errors import MLSA4RecError, check_choice
from mlsa4rec.evaluation.runs import load_run, load_weights
from mlsa4rec.models import build_model, get_class
from mlsa4rec.training import rundir
from mlsa4rec.training.distributed import resolve_device

log = logging.getLogger("mlsa4rec")

UNKNOWN = ("error", "drop")
FALLBACKS = (None, "popular")


class Recommendation(NamedTuple):
    item: int | str  # the data file's own item id
    score: float     # the model's score (a training-event count for the popularity fallback)


class Recommender:
    """A trained model with its item map, ready to score new histories."""

    def __init__(self, model: torch.nn.Module, config: Config, items: ItemMap, device: torch.device,
                 run_dir: Path | None = None) -> None:
        if items.n_items != model.n_items:
            raise MLSA4RecError(f"the item map has {items.n_items} items but the model {model.n_items}")
        self.model = model.to(device).eval()
        self.config = config
        self.items = items
        self.device = device
        self.run_dir = run_dir
        self.max_length: int = config["MAX_ITEM_LIST_LENGTH"]
        self.streams: bool = bool(getattr(model, "streams", False))
        self._step = model.step if self.streams else None

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
    def from_run(cls, run_dir: str | Path, device: str = "auto", data_dir: str | Path | None = None) -> Recommender:
        """Load a finished run: its files are checked against the manifest, the weights are
        safetensors (nothing is unpickled), and the item map comes from ``items.json`` (a run
        without one is rebuilt from its data, which must then be found)."""
        run = Path(run_dir)
        if not (run / "config.yaml").is_file():
            raise MLSA4RecError(f"{str(run)!r} is not a run directory (no config.yaml); pass the --output-dir of a "
                                "finished `mlsa4rec train`")
        if not (run / rundir.ITEMS).is_file():
            loaded = load_run(run, data_dir)
            items = ItemMap.from_data(loaded.data)
            return cls(loaded.model, loaded.config, items, _device(device, loaded.config), run)
        rundir.verify_run(run)
        saved = load_yaml_file(run / "config.yaml")
        if "model" not in saved or "dataset" not in saved:
            raise MLSA4RecError(f"{str(run / 'config.yaml')!r} lacks the model or dataset entry")
        config = build_config(str(saved["model"]), [run / "config.yaml"], extra={"dataset": saved["dataset"]})
        try:
            items = ItemMap.from_json(json.loads((run / rundir.ITEMS).read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MLSA4RecError(f"{str(run / rundir.ITEMS)!r} is damaged ({type(exc).__name__}); train the run "
                                "again") from None
        model = build_model(get_class(config["model"]), items.n_items, config.model_kwargs(),
                            config["MAX_ITEM_LIST_LENGTH"])
        load_weights(model, run / rundir.WEIGHTS)
        return cls(model, config, items, _device(device, config), run)

    # --- ids ---------------------------------------------------------------------------------------
    def to_ids(self, history: Iterable[Any], unknown: str = "error") -> list[int]:
        """Model ids of one history of raw ids; unknown ids are an error, or dropped with a warning."""
        check_choice("unknown", unknown, UNKNOWN, MLSA4RecError)
        ids, missing = self.items.ids(history)
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                                              else "")
            if unknown == "error":
                raise MLSA4RecError(f"unknown item id(s) {shown}: the run was not trained on them; pass "
                                    "unknown='drop' to ignore them")
            log.warning("dropped unknown item id(s) %s", shown)
        return ids

    # --- scoring -----------------------------------------------------------------------------------
    def batch(self, histories: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded input of model-id histories, as the evaluation builds it: the last L items,
        trimmed to the longest history for a padding-invariant model, the full L otherwise."""
        tails = [list(h)[-self.max_length:] for h in histories]
        if any(not t for t in tails):
            raise MLSA4RecError("a history is empty; give at least one item, or use fallback='popular'")
        lengths = [len(t) for t in tails]
        width = max(lengths) if getattr(self.model, "padding_invariant", False) else self.max_length
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

    def top_k(self, scores: torch.Tensor, k: int, seen: Sequence[Iterable[int]] | None = None,
              exclude: Iterable[Any] = ()) -> list[list[Recommendation]]:
        """The ``k`` best items of each row, minus the row's ``seen`` ids and the raw ids ``exclude``."""
        # a NaN is never a recommendation; infinities stay (the padding column is -inf); a copy
        scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        banned = [i for i in (self.items.id_of(x) for x in exclude) if i is not None]
        if banned:
            scores[:, banned] = float("-inf")
        for row, ids in enumerate(seen or []):
            ids = list(ids)
            if ids:
                scores[row, ids] = float("-inf")
        values, index = torch.topk(scores, min(k, scores.shape[1] - 1), dim=1)
        return [[Recommendation(self.items.token(int(i)), float(v)) for v, i in zip(vs, ix) if v > float("-inf")]
                for vs, ix in zip(values.tolist(), index.tolist())]

    def popular(self, k: int, skip: Iterable[int] = (), exclude: Iterable[Any] = ()) -> list[Recommendation]:
        banned = set(skip) | {i for i in (self.items.id_of(x) for x in exclude) if i is not None}
        return [Recommendation(self.items.token(i), float(self.items.counts[i - 1]))
                for i in self.items.most_popular(k, sorted(banned))]

    def check_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.items.n_items:
            raise MLSA4RecError(f"k must be a whole number from 1 to {self.items.n_items} (the items this run "
                                f"knows), got {k!r}")

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
            raise MLSA4RecError(f"fallback must be None or 'popular', got {fallback!r}")
        if isinstance(histories, (str, bytes)) or not all(
                isinstance(h, Sequence) and not isinstance(h, (str, bytes)) for h in histories):
            raise MLSA4RecError("histories must be a list of lists of item ids")
        exclude = list(exclude or ())
        ids = [self.to_ids(h, unknown) for h in histories]
        out: list[list[Recommendation]] = [[] for _ in ids]
        filled = [i for i, h in enumerate(ids) if h]
        for i, h in enumerate(ids):
            if not h:
                if fallback != "popular":
                    raise MLSA4RecError(f"history {i} is empty{' after dropping unknown ids' if histories[i] else ''}"
                                        "; give at least one item, or use fallback='popular'")
                out[i] = self.popular(k, exclude=exclude)
        if filled:
            scored = self.top_k(self.scores([ids[i] for i in filled]), k,
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

    _FORMAT = 1

    def __init__(self, rec: Recommender) -> None:
        self.rec = rec
        self.length = 0
        self.recent: list[int] = []  # the last L model ids
        self.seen: set[int] = set()
        self.state = rec.model.initial_state(1, device=rec.device) if rec.streams else None
        self.representation: torch.Tensor | None = None

    def add(self, item: Any, unknown: str = "error") -> bool:
        """Add one event (a raw id); False when ``unknown='drop'`` dropped it."""
        ids = self.rec.to_ids([item], unknown)
        self.add_ids(ids)
        return bool(ids)

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
            self.recent = (self.recent + [item_id])[-self.rec.max_length:]
            self.seen.add(item_id)
            self.length += 1

    def scores(self) -> torch.Tensor:
        """1 x (n_items + 1) scores after the events so far."""
        if not self.length:
            raise MLSA4RecError("the session has no events yet; add one first, or use fallback='popular'")
        if self.representation is not None:
            return self.rec.scores_from_state(self.representation)
        return self.rec.scores([self.recent])

    def recommend(self, k: int = 10, exclude_seen: bool = False, exclude: Iterable[Any] | None = None,
                  fallback: str | None = None) -> list[Recommendation]:
        self.rec.check_k(k)
        if not self.length and fallback == "popular":
            return self.rec.popular(k, exclude=exclude or ())
        return self.rec.top_k(self.scores(), k, [self.seen] if exclude_seen else None, exclude or ())[0]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this session after a restart: plain values and tensors
        (save it with ``torch.save`` and load it with ``torch.load(weights_only=True)``)."""
        leaves = pytree.tree_leaves(self.state) if self.state is not None else []
        return {"format": self._FORMAT, "model": self.rec.config["model"], "length": self.length,
                "recent": [self.rec.items.token(i) for i in self.recent],
                "seen": [self.rec.items.token(i) for i in sorted(self.seen)],
                "state": [t.detach().cpu() for t in leaves],
                "representation": None if self.representation is None else self.representation.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the session saved by ``state_dict`` (from the same run's model)."""
        keys = ("model", "length", "recent", "seen", "state", "representation")
        if not isinstance(state, dict) or state.get("format") != self._FORMAT or any(k not in state for k in keys):
            raise MLSA4RecError(f"not a session state saved by mlsa4rec (format 1 with {', '.join(keys)})")
        if state.get("model") != self.rec.config["model"]:
            raise MLSA4RecError(f"the session was saved by a {state.get('model')!r} model, not "
                                f"{self.rec.config['model']!r}")
        recent, seen = self.rec.to_ids(state["recent"]), self.rec.to_ids(state["seen"])
        fresh = self.rec.model.initial_state(1, device=self.rec.device) if self.rec.streams else None
        if fresh is not None and not state["state"]:  # saved past the model's stream_limit: re-encoding
            self.state = self.representation = None
        elif fresh is not None:
            leaves, spec = pytree.tree_flatten(fresh)
            saved = state["state"]
            if len(saved) != len(leaves) or any(a.shape != b.shape for a, b in zip(saved, leaves)):
                raise MLSA4RecError("the saved session state does not fit this model (another run's session?)")
            self.state = pytree.tree_unflatten([t.to(b.device, b.dtype) for t, b in zip(saved, leaves)], spec)
            rep = state["representation"]
            self.representation = None if rep is None else rep.to(self.rec.device)
        self.length = int(state["length"])
        self.recent = recent
        self.seen = set(seen)


def _device(name: str, config: Config) -> torch.device:
    return resolve_device(config["device"] if name == "auto" else name)
