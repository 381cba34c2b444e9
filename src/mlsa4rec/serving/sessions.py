"""Where the HTTP service keeps its live sessions: the interface the app uses (``Sessions``) and the
in-process store behind it (``SessionStore``, the default), so another store (Redis, shared by several
server processes) can stand in without touching the app."""

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Gauge

from mlsa4rec.serving.recommender import Session


class Sessions(Protocol):
    """Live sessions by id, each dropped after a while unused; what the app needs of a store."""

    def __len__(self) -> int:
        """The live sessions."""
        ...

    def get(self, sid: str) -> Session | None:
        """The live session ``sid`` (now its most recent use), or None."""
        ...

    def put(self, sid: str, session: Session) -> None:
        """Keep ``session`` as ``sid`` (replacing any)."""
        ...

    def delete(self, sid: str) -> bool:
        """Forget ``sid``; False if it was not live."""
        ...

    def sweep(self) -> int:
        """Drop the sessions idle too long (the app calls this periodically); how many were dropped."""
        ...


@dataclass
class _Entry:
    session: Session
    used: float


class SessionStore:
    """Live sessions by id in this process: least recently used first, dropped beyond ``cap`` or after
    ``ttl_s`` idle; ``gauge`` follows their number and ``dropped`` counts drops by reason (lru, idle)."""

    def __init__(self, cap: int, ttl_s: float, gauge: Gauge, dropped: Counter,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cap = cap
        self.ttl_s = ttl_s
        self.clock = clock
        self._gauge = gauge
        self._dropped = dropped
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, sid: str) -> Session | None:
        """The live session ``sid`` (now its most recent use), or None."""
        entry = self._entries.get(sid)
        if entry is None:
            return None
        now = self.clock()
        if now - entry.used > self.ttl_s:
            self._drop(sid, "idle")
            return None
        entry.used = now
        self._entries.move_to_end(sid)
        return entry.session

    def put(self, sid: str, session: Session) -> None:
        self._entries[sid] = _Entry(session, self.clock())
        self._entries.move_to_end(sid)
        while len(self._entries) > self.cap:
            self._drop(next(iter(self._entries)), "lru")
        self._gauge.set(len(self._entries))

    def delete(self, sid: str) -> bool:
        if self.get(sid) is None:
            return False
        del self._entries[sid]
        self._gauge.set(len(self._entries))
        return True

    def sweep(self) -> int:
        """Drop every session idle longer than the ttl; the oldest come first, so stop at a live one."""
        now, dropped = self.clock(), 0
        while self._entries:
            sid, entry = next(iter(self._entries.items()))
            if now - entry.used <= self.ttl_s:
                break
            self._drop(sid, "idle")
            dropped += 1
        return dropped

    def _drop(self, sid: str, reason: str) -> None:
        del self._entries[sid]
        self._dropped.labels(reason).inc()
        self._gauge.set(len(self._entries))
