"""The Redis session store: sessions survive the process, are refused when another run made them,
never lose an event to a concurrent change, and Redis going away is one line, then recovered."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
from tiny_runs import tiny_run

from conftest import RedisServer
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.serving.recommender import Recommender, Session
from mlsa4rec.serving.redis_sessions import RedisSessions, check_url, decode_session, encode_session
from mlsa4rec.serving.sessions import ServedRun, SessionRefused, SessionTooLarge, StoreUnavailable

pytest.importorskip("redis")


def recommender(name: str) -> Recommender:
    return Recommender.from_run(tiny_run(name))


@pytest.mark.parametrize("name", ["mlsa4rec-causal", "mamba4rec", "sasrec"])
def test_a_session_stored_and_read_back_continues_exactly(name: str) -> None:
    """A streaming model's state and a re-encoding model's recent items both travel."""
    rec = recommender(name)
    whole, stored = rec.session(), rec.session()
    whole.add_many(["i1", "i2", "i3"])
    stored.add_many(["i1", "i2", "i3"])
    back = decode_session(rec, encode_session(stored))
    for s in (whole, back):
        s.add_many(["i4", "i5"])
    assert torch.equal(back.scores(), whole.scores()) and back.seen == whole.seen and back.length == 5


def test_another_runs_or_a_damaged_session_is_refused_not_misread() -> None:
    causal, faithful, mamba = recommender("mlsa4rec-causal"), recommender("mlsa4rec"), recommender("mamba4rec")
    session = causal.session()
    session.add_many(["i1", "i2"])
    blob = encode_session(session)
    with pytest.raises(SessionRefused, match="saved by a 'mlsa4rec' model, not 'mamba4rec'"):
        decode_session(mamba, blob)
    with pytest.raises(SessionRefused, match="another run"):
        decode_session(faithful, blob)  # the same model, other weights
    for bad in (b"", b"hello", blob[:40], blob[:-7], blob[:30] + b"{" + blob[31:]):
        with pytest.raises(SessionRefused):
            decode_session(causal, bad)


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:6379", "--sessions takes memory or a Redis URL"),
    ("redis://", "--sessions takes memory or a Redis URL"),
    ("redis://h:port/0", "port of --sessions"),
    ("redis://:secret@h:6379/x", "database of --sessions redis://h:6379/x must be a number"),
    ("redis://:se/cret@h:6379/0", "--sessions takes memory or a Redis URL"),  # a '/' in the password
    ("redis://:se#cret@h:6379/0", "--sessions takes memory or a Redis URL"),
    ("redis://[::1", "--sessions takes memory or a Redis URL"),
])
def test_bad_redis_urls_are_one_line_and_hide_the_password(url: str, message: str) -> None:
    with pytest.raises(MLSA4RecError, match=message) as info:
        check_url(url)
    assert "secret" not in str(info.value) and "cret" not in str(info.value)


def run(coro):
    return asyncio.run(coro)


async def here(fn, *args):
    return fn(*args)


def served(rec: Recommender) -> ServedRun:
    """The run a store serves sessions for (model calls made here, at once)."""
    return ServedRun(rec, here)


def store(rec: Recommender, url: str, **kwargs) -> RedisSessions:
    return RedisSessions(url, ttl_s=kwargs.pop("ttl_s", 60.0), max_bytes=kwargs.pop("max_bytes", 1 << 20),
                         prefix=f"test:{uuid.uuid4().hex}", **kwargs)


def test_update_read_remove_and_expiry(redis_server: RedisServer) -> None:
    rec = recommender("mlsa4rec-causal")

    async def go() -> None:
        sessions = store(rec, redis_server.url, ttl_s=30.0)

        async def new():
            return rec.session()

        async def add(session):
            session.add_many(["i1", "i2"])
            return session.length

        assert await sessions.read("a", served(rec)) is None
        me = served(rec)
        assert await sessions.update("a", me, add, new) == 2 and await sessions.update("a", me, add, new) == 4
        back = await sessions.read("a", served(rec))
        whole = rec.session()
        whole.add_many(["i1", "i2", "i1", "i2"])
        assert torch.equal(back.scores(), whole.scores())
        ttl = await sessions.client.pttl(sessions._key("a"))
        assert 0 < ttl <= 30_000  # Redis expires it
        assert await sessions.remove("a") and not await sessions.remove("a") and await sessions.read("a", me) is None
        await sessions.close()

    run(go())


def test_concurrent_changes_of_one_session_lose_no_event(redis_server: RedisServer) -> None:
    rec = recommender("mamba4rec")

    async def go() -> int:
        sessions = [store(rec, redis_server.url) for _ in range(2)]  # two "processes" on one prefix
        sessions[1].prefix = sessions[0].prefix

        async def new():
            return rec.session()

        async def add(session):
            await asyncio.sleep(0.002)  # let the others read the same state meanwhile
            session.add_many(["i3"])
            return session.length

        await asyncio.gather(*(sessions[i % 2].update("s", served(rec), add, new) for i in range(12)))
        length = (await sessions[0].read("s", served(rec))).length
        for s in sessions:
            await s.close()
        return length

    assert run(go()) == 12


def test_a_session_over_the_size_limit_is_refused_and_not_written(redis_server: RedisServer) -> None:
    rec = recommender("sasrec")
    full = rec.session()
    full.add_many([f"i{i}" for i in range(1, 31)])
    limit = len(encode_session(full)) - 1

    async def go() -> None:
        sessions = store(rec, redis_server.url, max_bytes=limit)

        async def new():
            return rec.session()

        async def add(session):
            session.add_many([f"i{i}" for i in range(1, 31)])
            return session.length

        with pytest.raises(SessionTooLarge, match=f"over the limit of {limit:,}"):
            await sessions.update("big", served(rec), add, new)
        assert await sessions.read("big", served(rec)) is None
        await sessions.close()

    run(go())


def test_redis_going_away_is_one_line_and_the_store_recovers(redis_server: RedisServer) -> None:
    rec = recommender("gru4rec")
    server = RedisServer(redis_server.binary)  # its own, to be killed
    server.start()

    async def go() -> None:
        sessions = store(rec, server.url, timeout_s=0.5)

        async def new():
            return rec.session()

        async def add(session):
            session.add_many(["i1"])
            return session.length

        assert await sessions.update("x", served(rec), add, new) == 1
        server.stop()
        me = served(rec)
        calls = (sessions.read("x", me), sessions.update("x", me, add, new), sessions.remove("x"), sessions.check())
        for call in calls:
            with pytest.raises(StoreUnavailable, match=r"^the session store redis://127\.0\.0\.1:\d+/0 cannot be "
                                                       r"reached \(\w+\); try again shortly$"):
                await call
        server.start()  # an empty Redis (nothing was saved): the session is gone, the store works again
        assert await sessions.read("x", served(rec)) is None and await sessions.update("x", served(rec), add, new) == 1
        await sessions.close()

    try:
        run(go())
    finally:
        server.stop()


def test_a_session_another_run_made_is_re_encoded_written_back_and_reads_back(redis_server: RedisServer) -> None:
    """After a reload (or on a replica serving another run): the events, never the state, go on; the
    re-encoded session is stored, so the next read is the new run's own."""
    old, new = recommender("mlsa4rec-causal"), recommender("mlsa4rec")  # two runs of one model (name)
    expected = new.session()
    expected.add_many(["i1", "i2", "i3"])

    async def go() -> None:
        sessions = store(old, redis_server.url)

        async def fresh():
            return old.session()

        async def add(session):
            session.add_many(["i1", "i2", "i3"])
            return session.length

        await sessions.update("r", served(old), add, fresh)
        again = await sessions.read("r", served(new))
        assert again.rec is new and again.length == 3 and torch.equal(again.scores(), expected.scores())
        stored = await sessions.client.get(sessions._key("r"))
        assert decode_session(new, stored[16:]).length == 3  # written back: now the new run's own state
        await sessions.close()

    run(go())


@pytest.mark.parametrize("name", ["mlsa4rec-causal", "sasrec", "linrec"])
def test_a_re_encoded_session_round_trips_even_with_items_the_new_run_lacks(name: str) -> None:
    rec = recommender(name)
    limit = getattr(rec.model, "stream_limit", None)
    for recent, length in ((["i1", "NOPE", "i2"], 3), (["i1", "i2"], 40), ([f"i{i}" for i in range(1, 9)], 8)):
        session = Session.from_events(rec, recent, recent, length)
        back = decode_session(rec, encode_session(session))
        assert back.length == session.length and torch.equal(back.scores(), session.scores())
        assert (back.state is None) == (limit is not None and length > limit or not rec.streams)


def test_two_requests_on_a_session_of_the_run_before_a_reload_lose_no_event() -> None:
    """In-process: both re-encode it at once; the second one must use the first one's session."""
    from prometheus_client import CollectorRegistry, Counter

    from mlsa4rec.serving.sessions import SessionStore

    old, new = recommender("mamba4rec"), recommender("gru4rec")
    store_ = SessionStore(10, 60.0, None, Counter("d", "d", ["reason"], registry=CollectorRegistry()))
    first = old.session()
    first.add_many(["i1", "i2"])
    store_.put("u", first)

    async def yielding(fn, *args):
        await asyncio.sleep(0.01)  # the model thread is busy: the other request runs meanwhile
        return fn(*args)

    async def go() -> int:
        run_new = ServedRun(new, yielding)

        async def fresh():
            return new.session()

        def adder(item):
            async def add(session):
                session.add_many([item])
                return session.length
            return add

        await asyncio.gather(store_.update("u", run_new, adder("i3"), fresh),
                             store_.update("u", run_new, adder("i4"), fresh))
        return (await store_.read("u", run_new)).length

    assert run(go()) == 4
