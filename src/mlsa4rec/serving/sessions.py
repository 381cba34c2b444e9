"""Where the HTTP service keeps its live sessions: the interface the app uses (``Sessions``), the
in-process store behind it (``SessionStore``, the default) and the errors a store may answer with,
so that another store (``redis_sessions.RedisSessions``, shared by several server processes) stands
in without touching the app."""

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

from prometheus_client import Counter, Gauge

from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.serving.recommender import Recommender, Session

T = TypeVar("T")


class StoreUnavailable(MLSA4RecError):
    """The session store cannot be reached, or is too busy: HTTP 503 (the request may be sent again)."""


class SessionRefused(MLSA4RecError):
    """A stored session this run cannot continue (another run's, or damaged): HTTP 409."""


class SessionTooLarge(MLSA4RecError):
    """A session over the store's size limit: HTTP 413."""


class ServedRun(NamedTuple):
    """What a store needs of the run served now: the recommender, and how to run a call on the
    model's thread (re-encoding a session steps the model)."""

    rec: Recommender
    on_model_thread: Callable[..., Awaitable[Any]]


async def continued(session: Session, run: ServedRun) -> Session:
    """``session`` as the run served now continues it: itself (the same run, or the same weights
    loaded again: exactly the same state), or its events re-encoded by this run (a session made by
    another run: before a reload, or on a replica serving another run); a state is never read by
    other weights."""
    if session.rec is run.rec:
        return session
    if session.rec.fingerprint == run.rec.fingerprint:
        session.rec = run.rec
        return session
    return await run.on_model_thread(session.rebased, run.rec)


class Sessions(Protocol):
    """Live sessions by id, each dropped after a while unused; what the app needs of a store. ``run``
    is the run now served: a session another run made is re-encoded from its events by it
    (``continued``), a damaged one refused with ``SessionRefused``."""

    async def read(self, sid: str, run: ServedRun) -> Session | None:
        """The live session ``sid`` (now its most recent use), or None."""
        ...

    async def update(self, sid: str, run: ServedRun, apply: Callable[[Session], Awaitable[T]],
                     new: Callable[[], Awaitable[Session]]) -> T:
        """``apply`` session ``sid`` (``new()`` when it is not live) and keep the result, no other
        change to the session coming in between; returns what ``apply`` returned."""
        ...

    async def remove(self, sid: str) -> bool:
        """Forget ``sid``; False if it was not live."""
        ...

    async def count(self) -> int | None:
        """The live sessions, where the store can count them cheaply (else None)."""
        ...

    def sweep(self) -> int:
        """Drop the sessions idle too long (the app calls this periodically); how many were dropped."""
        ...

    async def close(self) -> None:
        """Let go of what the store holds open (connections), when the app stops."""
        ...


@dataclass
class _Entry:
    session: Session
    used: float


class SessionStore:
    """Live sessions by id in this process: least recently used first, dropped beyond ``cap`` or after
    ``ttl_s`` idle; ``gauge`` (if any) follows their number and ``dropped`` counts drops by reason
    (lru, idle)."""

    def __init__(self, cap: int, ttl_s: float, gauge: Gauge | None, dropped: Counter,
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
        self._set_gauge()

    def delete(self, sid: str) -> bool:
        if self.get(sid) is None:
            return False
        del self._entries[sid]
        self._set_gauge()
        return True

    # --- the app's interface (``Sessions``): the model thread runs ``apply`` one call at a time, so a
    # session object changed in place never loses an event here
    async def read(self, sid: str, run: ServedRun) -> Session | None:
        session = self.get(sid)
        if session is None or session.rec is run.rec:
            return session
        now = await continued(session, run)
        entry = self._entries.get(sid)
        if entry is None:
            return now  # deleted or dropped meanwhile: this request still answers from it
        if entry.session is not session:  # another request re-encoded (or replaced) it first: use that one
            return entry.session
        entry.session = now  # re-encoded once, not at every read
        return now

    async def update(self, sid: str, run: ServedRun, apply: Callable[[Session], Awaitable[T]],
                     new: Callable[[], Awaitable[Session]]) -> T:
        session = await self.read(sid, run)
        if session is None:
            session = await new()
            earlier = await self.read(sid, run)  # a request for the same id that got there while this one waited
            if earlier is not None:
                session = earlier
            else:
                self.put(sid, session)
        return await apply(session)

    async def remove(self, sid: str) -> bool:
        return self.delete(sid)

    async def count(self) -> int | None:
        return len(self)

    async def close(self) -> None:
        return None

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

    def _set_gauge(self) -> None:
        if self._gauge is not None:
            self._gauge.set(len(self._entries))

    def _drop(self, sid: str, reason: str) -> None:
        del self._entries[sid]
        self._dropped.labels(reason).inc()
        self._set_gauge()
