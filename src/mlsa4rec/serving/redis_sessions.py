"""Live sessions in Redis: every server process of a run shares them, and a restart loses none.

A session is stored under ``PREFIX:ID`` as one value (``encode_session``): a JSON header (the
session's events as item ids, and the fingerprint of the run that made it) and its model state
as safetensors, never a pickle. The run that made it reads its state back (``decode_session``,
through ``Session.load_state_dict``, which checks it); another run (before a reload, or on a
replica serving another run) re-encodes its events instead, never reading the state with other
weights; a value that is not such a session, or a damaged one, is refused (``SessionRefused``,
HTTP 409). Expiry is Redis's own: each write and each read sets the key's time to live to the
session ttl. A session over ``max_bytes`` is refused on write (``SessionTooLarge``, 413): a
session's ``seen`` items grow with its events.

Changes are optimistic: read the value (it begins with a random version), apply the events, write
the new value only if the version is unchanged (a compare-and-set Lua script), else again; so two
requests for one session, in one process or in two, never lose an event. Redis down or too
slow is ``StoreUnavailable`` (503) for the session endpoints only; the store reconnects by itself
when Redis is back.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.serving.recommender import Recommender, Session
from mlsa4rec.serving.sessions import ServedRun, SessionRefused, SessionTooLarge, StoreUnavailable

T = TypeVar("T")
MAGIC = b"MLSA4REC-SESSION\x01"  # the value's first bytes: a key written by something else is refused
PREFIX = "mlsa4rec:session"
RETRIES = 16  # optimistic transactions of one change before the store is reported busy
VERSION_BYTES = 16  # a stored value: a random version, then the session (encode_session)
# set KEYS[1] to ARGV[2] (time to live ARGV[3] ms) if its version is still ARGV[1] ('' : absent)
SWAP = """
if redis.call('GETRANGE', KEYS[1], 0, 15) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
TIMEOUT_S = 2.0  # a Redis call slower than this counts as Redis unavailable


def encode_session(session: Session) -> bytes:
    """``session.state_dict()`` as bytes: magic, the JSON header's length (4 bytes), the header,
    then the tensors as safetensors."""
    state = session.state_dict()
    tensors = {f"state.{i}": t.contiguous() for i, t in enumerate(state.pop("state"))}
    representation = state.pop("representation")
    if representation is not None:
        tensors["representation"] = representation.contiguous()
    state["tensors"] = len(tensors)
    header = json.dumps(state, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(header)) + header + save_tensors(tensors)


def parse_session(data: bytes) -> dict[str, Any]:
    """The ``state_dict`` ``encode_session`` stored (``SessionRefused`` when the value is not one)."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise SessionRefused("the stored value is not a session of mlsa4rec (or of another version of its format)")
    (size,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        state = json.loads(data[start:start + size])
        tensors = load_tensors(data[start + size:])
    except (ValueError, UnicodeDecodeError, SafetensorError) as exc:
        raise SessionRefused(f"the stored session is damaged ({type(exc).__name__})") from None
    count = state.pop("tensors", None) if isinstance(state, dict) else None
    names = [f"state.{i}" for i in range(len(tensors))]
    if not isinstance(count, int) or count != len(tensors) or not set(tensors) <= {*names, "representation"}:
        raise SessionRefused("the stored session is damaged (its header does not match its tensors)")
    state["state"] = [tensors[name] for name in names if name in tensors]
    state["representation"] = tensors.get("representation")
    return state


def decode_session(rec: Recommender, data: bytes | dict[str, Any]) -> Session:
    """The session ``encode_session`` stored (or its ``parse_session``), continued by the run that
    stored it (``rec``): its state checked by ``Session.load_state_dict``, ``SessionRefused`` naming
    why it cannot be used."""
    state = parse_session(data) if isinstance(data, bytes) else data
    session = rec.session()
    try:
        session.load_state_dict(state)
    except MLSA4RecError as exc:
        raise SessionRefused(str(exc)) from None
    return session


async def session_of(data: bytes, run: ServedRun) -> tuple[Session, bool]:
    """The stored session as the run served now continues it, and whether it was re-encoded: its
    state (the same run), or its events re-encoded by this run (another run made it: before a
    reload, or on a replica serving another run); a state is never read by other weights."""
    state = parse_session(data)
    if state.get("run") == run.rec.fingerprint:
        return decode_session(run.rec, state), False
    try:
        session = await run.on_model_thread(Session.from_events, run.rec, state["recent"], state["seen"],
                                            state["length"])
    except (MLSA4RecError, KeyError, TypeError, ValueError):
        raise SessionRefused("the stored session is damaged (its events cannot be read)") from None
    return session, True


class RedisSessions:
    """The session store of ``mlsa4rec serve --sessions redis://HOST:PORT/DB`` (``url``); the keys of
    one served model share ``prefix``."""

    def __init__(self, url: str, ttl_s: float, max_bytes: int, prefix: str = PREFIX,
                 timeout_s: float = TIMEOUT_S) -> None:
        import redis.asyncio as redis

        check_url(url)
        self.url, self.prefix = url, prefix
        self.ttl_ms = max(1, math.ceil(ttl_s * 1000))
        self.max_bytes = max_bytes
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry_on_timeout=False, health_check_interval=30)
        self._swap = self.client.register_script(SWAP)
        self.where = _shown(url)

    def _key(self, sid: str) -> str:
        return f"{self.prefix}:{sid}"

    async def read(self, sid: str, run: ServedRun) -> Session | None:
        """The live session ``sid`` (its time to live starts again), or None. A session another run
        made is re-encoded and written back (if nobody changed it meanwhile), so once, not at every
        read."""
        key = self._key(sid)
        async with self._available():
            data = await self.client.getex(key, px=self.ttl_ms)
            if data is None:
                return None
            session, reencoded = await session_of(data[VERSION_BYTES:], run)
            if reencoded:
                blob = encode_session(session)
                if len(blob) <= self.max_bytes:
                    await self._swap(keys=[key], args=[data[:VERSION_BYTES], os.urandom(VERSION_BYTES) + blob,
                                                       self.ttl_ms])
        return session

    async def update(self, sid: str, run: ServedRun, apply: Callable[[Session], Awaitable[T]],
                     new: Callable[[], Awaitable[Session]]) -> T:
        """Apply ``apply`` to session ``sid`` (made by ``new`` if it is not live) and store the result,
        as one compare-and-set: each stored value begins with a random version, and the new value is
        written only if the version is still the one read (a Lua script, atomic in Redis); when
        another request changed the session meanwhile, start again from its new state. Two round
        trips an event."""
        key = self._key(sid)
        async with self._available():
            for _ in range(RETRIES):
                data = await self.client.get(key)
                session = await new() if data is None else (await session_of(data[VERSION_BYTES:], run))[0]
                result = await apply(session)
                blob = encode_session(session)
                if len(blob) > self.max_bytes:
                    raise SessionTooLarge(f"session {sid!r} would take {len(blob):,} bytes, over the limit of "
                                          f"{self.max_bytes:,} (--max-session-bytes); delete it and start another")
                seen = b"" if data is None else data[:VERSION_BYTES]
                if await self._swap(keys=[key], args=[seen, os.urandom(VERSION_BYTES) + blob, self.ttl_ms]):
                    return result
        raise StoreUnavailable(f"session {sid!r} kept changing under {RETRIES} attempts to update it; send the "
                               "events again")

    async def remove(self, sid: str) -> bool:
        async with self._available():
            return bool(await self.client.delete(self._key(sid)))

    async def count(self) -> int | None:
        """Not counted: one Redis serves many processes and runs (``/health`` says null)."""
        return None

    def sweep(self) -> int:
        return 0  # Redis expires the keys itself

    async def check(self) -> None:
        """Fail now, with one line, when Redis cannot be reached (``serve`` calls this on start)."""
        async with self._available():
            await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()

    def _available(self):
        return _Translate(self.where)


class _Translate:
    """Redis' connection and timeout errors as ``StoreUnavailable``: one line, a 503, no traceback."""

    def __init__(self, where: str) -> None:
        self.where = where

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
            raise StoreUnavailable(f"the session store {self.where} cannot be reached ({type(exc).__name__}); "
                                   "try again shortly") from None
        if isinstance(exc, RedisError):
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise StoreUnavailable(f"the session store {self.where} refused the request: {first:.200}") from None
        return False


def check_url(url: str) -> None:
    """A Redis URL ``serve`` can use: redis:// or rediss:// (TLS), with a host."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. an unclosed [IPv6 address
        host = None
        parts = None
    if parts is None or parts.scheme not in ("redis", "rediss") or not host:
        raise MLSA4RecError(f"--sessions takes memory or a Redis URL such as redis://127.0.0.1:6379/0, got "
                            f"{_shown(url)!r:.200}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise MLSA4RecError(f"the port of --sessions {_shown(url)} is not a number") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise MLSA4RecError(f"the database of --sessions {_shown(url)} must be a number (redis://HOST:PORT/0)")


def _shown(url: str) -> str:
    """The URL without its password (it may sit in the URL: redis://:PASSWORD@host, and may hold a
    '/', '#' or '?' a URL parser would take for the path): everything up to the last '@' goes."""
    scheme, sep, rest = url.partition("://")
    where = rest.rpartition("@")[2] if sep else "?"
    return f"{scheme}://{where or '?'}"
