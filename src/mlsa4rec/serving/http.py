"""The HTTP service over a trained run (FastAPI): recommendations, live sessions, health, metrics.

    app = create_app(Recommender.from_run("runs/mamba4rec-beauty"))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # or: mlsa4rec serve --run-dir DIR

Endpoints (item ids are always the data file's own ids; the OpenAPI docs are at /docs):

    POST   /recommend                      {"histories": [[...], ...], "k": 10, "exclude_seen": false}
    POST   /sessions/{id}/events           {"items": ["i1", ...]}  (creates the session on first use)
    GET    /sessions/{id}/recommendations  ?k=10&exclude_seen=false
    DELETE /sessions/{id}
    GET    /health, /metrics (Prometheus text), /openapi.json, /docs, /redoc
    GET    /models                         the runs served by name
    POST   /models/{name}/reload           load that run's directory again and serve it
    ...    /models/{name}/recommend, /models/{name}/sessions/...   a named model's own endpoints

Every error is JSON ``{"error": "one line"}`` (validation errors add ``detail``, one entry per
field): 422 for a body or parameter that cannot be used (naming the field, or the unknown item
ids), 400 for a body that is not JSON, 415 for a POST without ``Content-Type: application/json``,
404 for an unknown session, 413 for a body over the limit (or a session over its size), 409 for
a session another run made or a reload that failed, 503 while the session store is unreachable.
An unexpected failure is a 500 ``{"error": "internal error ..."}``, never a traceback (that goes
to the server log).

Model calls run one at a time on a single worker thread, so the event loop stays free and the
model is never entered from two threads. Single-history ``/recommend`` calls that queue while the
model is busy are scored together in one model call (``max_batch`` at most), each then ranked on
its own; under concurrent load a batch also waits up to ``batch_window_ms`` for as many requests
as the previous batch held, while a lone request never waits (see ``batcher.Batcher``);
``batch_window_ms=0`` scores every request alone. Every answer's top k is exact, found
``Recommender.score_chunk`` items at a time, or comes from the approximate index of a Recommender
made with ``ann='hnsw'`` (a reload keeps those options). Sessions live in memory,
at most ``max_sessions`` (the least recently used is dropped first) and each for
``session_ttl_s`` after its last use (checked on every access and by a periodic sweep).

Models and sessions (keyword arguments of ``create_app``):

    recommender     one Recommender (named after its run directory), or {name: Recommender}
    default_model   the name the root endpoints serve (default: the only one; with several, none:
                    the root endpoints are a 404 naming them)
    loaders         {name: a function loading the run again}, for POST /models/{name}/reload
                    (default: Recommender.from_run of the run directory on its device)
    sessions        "memory" (default), or a Redis URL (``redis_sessions``): shared by every server
                    process of the run, kept across restarts; 503 while Redis cannot be reached
    max_session_bytes  a session whose stored state would grow past this is refused (413; Redis)

A reload loads the run off the model thread, verified against its manifest, swaps it in at once
and lets the previous batcher answer what it holds (a run that cannot be loaded is a 409 and
changes nothing). A session made by another run (before the reload, or by a replica serving
another run) is re-encoded from its last L events by the run served now when next used.

Access (keyword arguments of ``create_app``; everything is open by default, as on a trusted network):

    tokens          bearer tokens: with any, every request needs ``Authorization: Bearer TOKEN``
                    with one of them (401 otherwise), except GET /health, /metrics (below), the docs
                    (below) and CORS preflights; ``None`` or empty: no token needed
    metrics_public  with tokens, /metrics stays open to Prometheus (default True)
    docs_public     with tokens, /docs, /redoc, /openapi.json and the docs' scripts are open too
                    (default False)
    cors_origins    origins (``https://app.example.com``, or ``*``) whose pages may call the service
                    from a browser: CORS headers on every answer, errors included (but an unexpected
                    500, answered outside the middlewares); none by default (no CORS layer: an
                    OPTIONS request is a 405)

A request without the header is a 401 ``{"error": "this server needs a token: ..."}`` with
``WWW-Authenticate: Bearer``; a malformed header or an unknown token a 401 ``{"error": "the token
is not valid"}`` with ``WWW-Authenticate: Bearer error="invalid_token"``. /docs and /redoc load
their scripts from the installed fastapi-offline package, never from a CDN, so they work offline.

On SIGTERM (``mlsa4rec serve``) the server stops accepting connections, answers the requests in
flight, and exits 0; requests still unanswered after ``SHUTDOWN_GRACE_S`` are cancelled.

This module wires the app (routes, error handlers, metrics); the bodies are in ``schemas``, the
session store in ``sessions``, the model's worker thread and the micro-batcher in ``batcher``, and
what runs around every request in ``middleware``.
"""

import asyncio
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount

from mlsa4rec.errors import BrokenModelError, MLSA4RecError
from mlsa4rec.serving.batcher import Batcher, ModelWorker
from mlsa4rec.serving.middleware import BearerAuth, BodyLimit, Cors, JsonSpelling, Metrics, is_token
from mlsa4rec.serving.recommender import Recommendation, Recommender, Session, flag, option_style
from mlsa4rec.serving.schemas import (
    ERRORS,
    SESSION_ID,
    Deleted,
    ErrorBody,
    EventsResponse,
    Health,
    ModelList,
    RecommendResponse,
    Reloaded,
    SessionRecommendations,
    request_models,
)
from mlsa4rec.serving.sessions import (
    ServedRun,
    SessionRefused,
    Sessions,
    SessionStore,
    SessionTooLarge,
    StoreUnavailable,
)

log = logging.getLogger("mlsa4rec")

#: create_app's limits and settings, and their defaults (``mlsa4rec serve`` shows the same).
DEFAULTS: dict[str, Any] = {
    "max_body_bytes": 1_048_576,   # a request body over this is refused with 413
    "max_histories": 256,          # histories in one /recommend request
    "max_history_length": 1000,    # items in one history, one events request or one exclude list
    "max_k": 1000,                 # the largest k (never more than the items the run knows)
    "max_sessions": 100_000,       # live sessions; beyond this the least recently used one is dropped
    "session_ttl_s": 1800.0,       # a session unused this long is dropped
    "batch_window_ms": 2.0,        # under load, how long a merged model call waits for more requests; 0: off
    "max_batch": 64,               # histories in one merged model call
    "max_session_bytes": 1_048_576,  # a session whose stored state would grow over this is refused (413)
}
#: create_app's access settings and their defaults: open to anyone who can reach it, no CORS.
ACCESS_DEFAULTS: dict[str, Any] = {"tokens": None, "metrics_public": True, "docs_public": False, "cors_origins": ()}
DOCS_STATIC = "/static-offline-docs"  # where fastapi-offline serves the docs' scripts and stylesheets
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
CORS_METHODS = ("GET", "POST", "DELETE", "OPTIONS")
CORS_HEADERS = ("Authorization", "Content-Type")
CORS_MAX_AGE_S = 600  # how long a browser may reuse a preflight's answer
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9.-]*[a-z0-9])?)(:[0-9]{1,5})?",
                    re.IGNORECASE)  # scheme://host[:port], host a name, an IPv4 or a [bracketed IPv6] address
SHUTDOWN_GRACE_S = 10.0  # on SIGTERM, how long `mlsa4rec serve` waits for the requests in flight
LIMIT_MAX = 2 ** 31 - 1
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INTERNAL = "internal error; the server log has the details"
FASTAPI_UNREADABLE = "There was an error parsing the body"
UNREADABLE = "the body cannot be read as JSON (it is not UTF-8 text, or it is nested too deeply); send a JSON object"
STORE_ERRORS: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "the stored session is damaged"},
    503: {"model": ErrorBody, "description": "the session store cannot be reached; send the request again"}}
NO_SESSION = {404: {"model": ErrorBody, "description": "no such session (or it expired)"}, 422: ERRORS[422],
              **STORE_ERRORS}
SESSION_ERRORS = {**ERRORS, **STORE_ERRORS,
                  413: {"model": ErrorBody, "description": "the body, or the session it makes, is over its limit"}}
MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def create_app(recommender: Recommender | Mapping[str, Recommender], *,
               max_body_bytes: int = DEFAULTS["max_body_bytes"],
               max_histories: int = DEFAULTS["max_histories"],
               max_history_length: int = DEFAULTS["max_history_length"], max_k: int = DEFAULTS["max_k"],
               max_sessions: int = DEFAULTS["max_sessions"], session_ttl_s: float = DEFAULTS["session_ttl_s"],
               batch_window_ms: float = DEFAULTS["batch_window_ms"], max_batch: int = DEFAULTS["max_batch"],
               max_session_bytes: int = DEFAULTS["max_session_bytes"],
               tokens: Collection[str] | None = ACCESS_DEFAULTS["tokens"],
               metrics_public: bool = ACCESS_DEFAULTS["metrics_public"],
               docs_public: bool = ACCESS_DEFAULTS["docs_public"],
               cors_origins: Collection[str] = ACCESS_DEFAULTS["cors_origins"],
               sessions: str = "memory", default_model: str | None = None,
               loaders: Mapping[str, Callable[[], Recommender]] | None = None) -> FastAPI:
    """A FastAPI app serving ``recommender``, or several runs by name (``{name: recommender}``); the
    limits, the access settings and the model settings are described in the module docstring."""
    served = _named(recommender)
    for rec in served.values():
        rec.fingerprint  # noqa: B018 - hashed now, not on the event loop at the first session request
    limits = {"max_body_bytes": max_body_bytes, "max_histories": max_histories,
              "max_history_length": max_history_length, "max_k": max_k, "max_sessions": max_sessions,
              "session_ttl_s": session_ttl_s, "batch_window_ms": batch_window_ms, "max_batch": max_batch,
              "max_session_bytes": max_session_bytes}
    _check_limits(limits)
    allowed, origins = _check_access(tokens, metrics_public, docs_public, cors_origins)
    if default_model is None and len(served) == 1:
        default_model = next(iter(served))
    if default_model is not None and default_model not in served:
        raise MLSA4RecError(f"the default model {default_model!r} is not one of the models served "
                            f"({', '.join(served)})")
    unknown_loaders = sorted(set(loaders or {}) - set(served))
    if unknown_loaders:
        raise MLSA4RecError(f"loaders name {unknown_loaders[0]!r}, which is not a model served ({', '.join(served)})")
    meters = _Meters.create()
    worker = ModelWorker()

    def batcher_for(rec: Recommender) -> Batcher | None:
        return (Batcher(rec, worker.run, batch_window_ms / 1000, max_batch, meters.batch_sizes)
                if batch_window_ms > 0 else None)

    slots = {name: Slot(name, Served(rec, batcher_for(rec), time.time()),
                        _store(sessions, name, limits, meters), (loaders or {}).get(name) or _reloader(rec),
                        batcher_for) for name, rec in served.items()}
    default = slots.get(default_model) if default_model is not None else None
    first = default or next(iter(slots.values()))
    rec = first.served.rec
    names = ", ".join(slots)
    # /docs and /redoc load their scripts from the installed package, so they work without the internet
    app = FastAPIOffline(title="mlsa4rec", version=_version(), lifespan=_lifespan, exception_handlers=ERROR_HANDLERS,
                         description=(f"Recommendations of the {rec.config.model} run "
                                      f"{rec.run_dir.name if rec.run_dir else ''} trained on {rec.config.dataset}"
                                      if len(slots) == 1 else f"Recommendations of the runs {names} "
                                      "(under /models/NAME/...)") + ", in the data file's own item ids. Errors are "
                                     "JSON {\"error\": \"...\"}.")
    app.state.recommender, app.state.slots, app.state.limits = rec, slots, limits
    app.state.sessions = first.sessions
    app.state.session_store = "memory" if sessions == "memory" else first.sessions.where  # type: ignore[attr-defined]
    app.state.access = {"tokens": len(allowed), "metrics_public": metrics_public, "docs_public": docs_public,
                        "cors_origins": origins}  # what is open, for the server's log; never the tokens
    app.state.registry, app.state.worker = meters.registry, worker
    memory = [slot.sessions for slot in slots.values() if isinstance(slot.sessions, SessionStore)]
    if memory:
        meters.live.set_function(lambda: sum(len(store) for store in memory))

    def resolve_default() -> Slot:
        if default is None:
            raise StarletteHTTPException(404, f"several models are served ({names}) and none is the default: name "
                                              "one, as /models/NAME/...")
        return default

    # one pair of request bodies for every model (one schema in the docs): k up to the largest catalogue's
    # size there, and a k over a model's own items is refused by the model (422, naming the largest)
    bodies = request_models(limits, max(slot.served.rec.items.n_items for slot in slots.values()))
    _add_model_routes(app, "", resolve_default, worker, limits, bodies, (default or first).served.rec.items.n_items)
    for name, slot in slots.items():
        _add_model_routes(app, f"/models/{name}", lambda slot=slot: slot, worker, limits, bodies,
                          slot.served.rec.items.n_items)
    _add_models(app, slots, default_model)
    _add_status(app, slots, first, limits, meters.registry)

    # the last added runs first: Metrics, Cors, BearerAuth, BodyLimit, JsonSpelling, then the routes
    app.add_middleware(JsonSpelling)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if allowed:  # outside BodyLimit: nobody without a token makes the server read a body
        open_paths = {"/health"} | ({"/metrics"} if metrics_public else set()) | (
            set(DOCS_PATHS) if docs_public else set())
        # the docs' scripts: fastapi-offline's mount (DOCS_STATIC), the app's only one
        static = [route.path + "/" for route in app.routes if isinstance(route, Mount)] if docs_public else []
        app.add_middleware(BearerAuth, tokens=allowed, open_paths=open_paths, open_prefixes=static)
        _document_tokens(app, open_paths)
    if origins:  # outside BearerAuth: a preflight needs no token, and errors (401, 413, ...) carry the CORS headers
        app.add_middleware(Cors, allow_origins=origins, allow_methods=CORS_METHODS, allow_headers=CORS_HEADERS,
                           max_age=CORS_MAX_AGE_S)
    # outermost: counts the 401s and 413s too
    app.add_middleware(Metrics, router=app.router, requests=meters.requests, latency=meters.latency)
    return app


def origin_problem(origin: object) -> str | None:
    """What is wrong with ``origin`` as an allowed CORS origin (None: nothing). A browser sends
    ``scheme://host[:port]``, nothing more, and the match is exact, so a path never matches."""
    if origin == "*":
        return None
    if not isinstance(origin, str) or not origin:
        return f"an origin is a string such as https://app.example.com, got {origin!r:.80}"
    if ORIGIN.fullmatch(origin):
        return None
    scheme, sep, rest = origin.partition("://")
    bare = f"{scheme}://{rest.split('/')[0]}"
    if sep and ORIGIN.fullmatch(bare):
        return f"an origin has no path: write {bare} rather than {origin!r:.80} (browsers send scheme://host[:port])"
    return f"an origin is scheme://host[:port] (such as https://app.example.com:8443) or *, got {origin!r:.80}"


def _check_access(tokens: Collection[str] | None, metrics_public: bool, docs_public: bool,
                  cors_origins: Collection[str]) -> tuple[list[str], list[str]]:
    """The tokens (unique, in order) and the allowed origins (lower case, as browsers send them);
    a bad one is an ``MLSA4RecError`` that never shows a token."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (Collection, type(None))):
        raise MLSA4RecError(f"tokens must be a list of strings (or None), not a {type(tokens).__name__}")
    for i, token in enumerate(tokens or ()):
        if not isinstance(token, str) or not is_token(token):
            raise MLSA4RecError(f"tokens[{i}] is not a token: a token is one word of visible ASCII characters "
                                "(no spaces), such as python -c 'import secrets; print(secrets.token_urlsafe(32))' "
                                "prints")
    for name, value in (("metrics_public", metrics_public), ("docs_public", docs_public)):
        if not isinstance(value, bool):
            raise MLSA4RecError(f"{name} must be True or False, got {value!r:.80}")
    if isinstance(cors_origins, (str, bytes)) or not isinstance(cors_origins, Collection):
        raise MLSA4RecError(f"cors_origins must be a list of origins, not a {type(cors_origins).__name__}")
    for origin in cors_origins:
        problem = origin_problem(origin)
        if problem:
            raise MLSA4RecError(f"cors_origins: {problem}")
    return list(dict.fromkeys(tokens or ())), list(dict.fromkeys(o.lower() for o in cors_origins))


def _document_tokens(app: FastAPI, open_paths: Collection[str]) -> None:
    """With tokens, the OpenAPI schema says which operations need one (and their 401), so the docs'
    Authorize button sends it with "Try it out"."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema.get("paths", {}).items():
                if path in open_paths:
                    continue
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
                    operation.setdefault("responses", {})["401"] = {
                        "description": "no token, or one the server does not know",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _check_limits(limits: dict[str, Any]) -> None:
    for name, value in limits.items():
        whole = name not in ("session_ttl_s", "batch_window_ms")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int)):
            raise MLSA4RecError(f"{flag(name)} must be a {'whole ' if whole else ''}number, got {value!r}")
        least = 0 if name == "batch_window_ms" else 1 if whole else 0.001
        if not value >= least or value == float("inf"):
            raise MLSA4RecError(f"{flag(name)} must be at least {least} (and finite), got {value!r}")
        if value > LIMIT_MAX:  # pydantic cannot build the request schema with larger bounds; no real limit comes close
            raise MLSA4RecError(f"{flag(name)} must be at most {LIMIT_MAX:,}, got {value!r}")


@dataclass(frozen=True)
class _Meters:
    """The app's Prometheus metrics, in a registry of its own (its /metrics page)."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    live: Gauge
    dropped: Counter
    batch_sizes: Histogram

    @classmethod
    def create(cls) -> "_Meters":
        registry = CollectorRegistry()
        return cls(
            registry,
            Counter("mlsa4rec_http_requests", "HTTP requests by endpoint, method and status",
                    ["endpoint", "method", "status"], registry=registry),
            Histogram("mlsa4rec_http_request_duration_seconds", "HTTP request latency by endpoint",
                      ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry),
            Gauge("mlsa4rec_sessions", "live sessions", registry=registry),
            Counter("mlsa4rec_sessions_dropped", "sessions dropped: lru (over max_sessions) or idle (ttl)",
                    ["reason"], registry=registry),
            Histogram("mlsa4rec_batch_size", "histories per merged model call of single-history requests",
                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry))


@dataclass(frozen=True)
class Served:
    """One run as it is served: its recommender and micro-batcher, and when it was loaded. A reload
    builds a new one; requests already running finish on the one they took."""

    rec: Recommender
    batcher: Batcher | None
    loaded: float  # time.time()


class Slot:
    """A model served under a name: its current run (``served``, swapped whole by a reload), its
    session store, and how to load its run again."""

    def __init__(self, name: str, served: Served, sessions: Sessions, load: Callable[[], Recommender],
                 batcher_for: Callable[[Recommender], Batcher | None]) -> None:
        self.name, self.served, self.sessions, self.load = name, served, sessions, load
        self.batcher_for = batcher_for
        self.reloading = asyncio.Lock()  # one reload at a time per model

    def run(self, worker: ModelWorker) -> ServedRun:
        """What the session store needs of the run served now."""
        return ServedRun(self.served.rec, worker.run)

    def _load(self) -> Recommender:
        rec = self.load()
        rec.fingerprint  # noqa: B018 - hashed here, off the event loop (it reads every weight)
        return rec

    async def reload(self) -> tuple[Served, Served]:
        """Load the run again (checked against its manifest), off the model's thread so that requests
        keep being answered, then swap it in; returns (before, after)."""
        async with self.reloading:
            try:
                rec = await asyncio.to_thread(self._load)
            except MLSA4RecError as exc:
                raise ReloadFailed(f"cannot reload {self.name!r}: {str(exc).splitlines()[0] if str(exc) else exc}; "
                                   "the run served before is still served") from None
            except OSError as exc:
                raise ReloadFailed(f"cannot reload {self.name!r}: {exc.strerror or exc}; the run served before is "
                                   "still served") from None
            before = self.served
            after = Served(rec, self.batcher_for(rec), time.time())
            if after.batcher is not None:
                after.batcher.start()
            self.served = after  # from here on, new requests use the new run
            if before.batcher is not None:
                await before.batcher.retire()  # after answering what was submitted to it
            return before, after


class ReloadFailed(MLSA4RecError):
    """A reload that could not load the run: the previous one is still served (HTTP 409)."""


def _named(recommender: Recommender | Mapping[str, Recommender]) -> dict[str, Recommender]:
    """The runs to serve by name: one run is named after its directory."""
    if isinstance(recommender, Recommender):
        name = recommender.run_dir.name if recommender.run_dir is not None else "model"
        return {_model_name(name): recommender}
    if not isinstance(recommender, Mapping) or not recommender:
        raise MLSA4RecError("create_app serves a Recommender, or a mapping of names to Recommenders")
    for name, rec in recommender.items():
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            raise MLSA4RecError(f"a served model's name must be 1-64 letters, digits, '.', '_' or '-' (it goes in "
                                f"URLs: /models/NAME/...), got {name!r:.80}")
        if not isinstance(rec, Recommender):
            raise MLSA4RecError(f"model {name!r} is a {type(rec).__name__}, not a Recommender")
    return dict(recommender)


def _model_name(name: str) -> str:
    """A directory's name as a model name in URLs (unusable characters become '-')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:64].strip(".") or "model"
    return cleaned


def _store(url: str, name: str, limits: dict[str, Any], meters: "_Meters") -> Sessions:
    """The session store of model ``name``: in this process (``memory``) or in Redis (a URL)."""
    if url == "memory":
        return SessionStore(limits["max_sessions"], limits["session_ttl_s"], None, meters.dropped)
    if not isinstance(url, str):
        raise MLSA4RecError(f"sessions must be 'memory' or a Redis URL, got {url!r:.80}")
    from mlsa4rec.serving.redis_sessions import PREFIX, RedisSessions

    try:
        return RedisSessions(url, limits["session_ttl_s"], limits["max_session_bytes"], prefix=f"{PREFIX}:{name}")
    except ImportError as exc:
        raise MLSA4RecError(f"Redis sessions need the redis extra ({exc.name} is missing): pip install "
                            "'mlsa4rec[redis]'") from None


def _reloader(rec: Recommender) -> Callable[[], Recommender]:
    """Load ``rec``'s run directory again, on its device and with its ranking options (``score_chunk``,
    ``ann``...; what ``POST /models/NAME/reload`` does)."""
    if rec.run_dir is None:
        def refuse() -> Recommender:
            raise MLSA4RecError("this model was not loaded from a run directory, so there is nothing to load again")
        return refuse
    run_dir, device, options = rec.run_dir, str(rec.device), rec.options
    return lambda: Recommender.from_run(run_dir, device=device, **options)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the app runs: the model's worker thread, the batchers and the periodic session sweep."""
    worker: ModelWorker = app.state.worker
    slots: dict[str, Slot] = app.state.slots
    worker.start()
    for slot in slots.values():
        if slot.served.batcher is not None:
            slot.served.batcher.start()
        check = getattr(slot.sessions, "check", None)
        if check is not None:
            try:
                await check()
            except MLSA4RecError as exc:  # served anyway: the session endpoints answer 503 until it is back
                log.warning("%s; the session endpoints answer 503 until it can be reached", exc)
    period = max(0.05, min(app.state.limits["session_ttl_s"] / 2, 30.0))
    sweep = asyncio.get_running_loop().create_task(_sweeper([s.sessions for s in slots.values()], period))
    try:
        yield
    finally:
        sweep.cancel()
        for slot in slots.values():
            if slot.served.batcher is not None:
                await slot.served.batcher.stop()
            await slot.sessions.close()
        worker.stop()


async def _sweeper(stores: list[Sessions], period: float) -> None:
    while True:
        await asyncio.sleep(period)
        for store in stores:
            store.sweep()


# --- errors: always one JSON line, never a traceback ---
def _field(loc: tuple[Any, ...]) -> str:
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "JSON decode error")
            return JSONResponse({"error": f"the body is not valid JSON: {reason}"}, status_code=400)
    detail = [{"field": _field(tuple(e.get("loc", ()))),
               "msg": str(e.get("msg", "invalid")).removeprefix("Value error, "),
               "type": str(e.get("type", "invalid"))} for e in errors]
    shown = "; ".join(f"{d['field']}: {d['msg']}" for d in detail[:3])
    more = f" (and {len(detail) - 3} more)" if len(detail) > 3 else ""
    return JSONResponse({"error": f"invalid request: {shown}{more}", "detail": detail}, status_code=422)


#: errors of the session store and of reloads, by the status they answer with (others: 422)
STATUS_OF = ((StoreUnavailable, 503), (SessionRefused, 409), (ReloadFailed, 409), (SessionTooLarge, 413))


async def _unusable(request: Request, exc: MLSA4RecError) -> JSONResponse:
    broken = isinstance(exc, BrokenModelError)  # the run is at fault, not the request
    if broken or isinstance(exc, (StoreUnavailable, ReloadFailed)):
        log.error("%s %s: %s", request.method, request.url.path, exc)
    status = 500 if broken else next((code for kind, code in STATUS_OF if isinstance(exc, kind)), 422)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__},
                        status_code=status, headers=headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = str(exc.detail)
    if exc.status_code == 400 and detail == FASTAPI_UNREADABLE:  # FastAPI's words for any decoding failure
        detail = UNREADABLE
    return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": INTERNAL}, status_code=500)


ERROR_HANDLERS: dict[Any, Any] = {RequestValidationError: _invalid, MLSA4RecError: _unusable,
                                  StarletteHTTPException: _http_error, Exception: _internal}


# --- endpoints ---
async def json_body(request: Request) -> None:
    """A POST body must say it is JSON: anything else is a 415 naming the header (rather than a 422
    about a body FastAPI then does not read)."""
    given = request.headers.get("content-type")
    main, _, sub = (given or "").split(";")[0].strip().lower().partition("/")
    if main != "application" or not (sub == "json" or sub.endswith("+json")):
        got = f"got {given!r:.80}" if given is not None else "it is missing"
        raise StarletteHTTPException(415, f"the request needs the header Content-Type: application/json ({got}), "
                                          "with a JSON body")


def _recommendations(recs: list[Recommendation]) -> list[dict[str, Any]]:
    return [{"item": r.item, "score": r.score} for r in recs]


def _add_model_routes(app: FastAPI, prefix: str, resolve: Callable[[], Slot], worker: ModelWorker,
                      limits: dict[str, Any], bodies: tuple[type, type], n_items: int) -> None:
    """A model's endpoints under ``prefix`` ("" for the default model, /models/NAME for a named one):
    /recommend and the sessions. Each request takes the model's run as it is when it starts."""
    RecommendRequest, EventsRequest = bodies  # noqa: N806
    k_limit, max_exclude = min(limits["max_k"], n_items), limits["max_history_length"]
    SessionId = Annotated[str, PathParam(pattern=SESSION_ID, description="any id of 1-128 letters, digits, ._~:@-")]  # noqa: N806
    K = Annotated[int, Query(ge=1, le=k_limit, description="how many items")]  # noqa: N806
    default_k = min(10, k_limit)  # a run with fewer than 10 items answers with all of them
    tags = [prefix.removeprefix("/models/")] if prefix else None

    @app.post(f"{prefix}/recommend", response_model=RecommendResponse, responses=ERRORS, tags=tags,
              summary="top-k items per history", dependencies=[Depends(json_body)])
    async def recommend(body: RecommendRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """The ``k`` best items for each history (item ids of the data file, oldest first), scored as
        the evaluation scores a test user (the last L items)."""
        served = resolve().served
        rec, batcher = served.rec, served.batcher
        if batcher is not None and batcher.running and len(body.histories) == 1:
            ids = rec.to_ids(body.histories[0], body.unknown)
            if ids:  # exclusions are checked here, so a bad one never fails the merged model call
                exclude = [rec.items.token(i) for i in rec.exclude_ids(body.exclude, body.unknown)]
                answer = await batcher.submit(ids, body.k, body.exclude_seen, exclude)
                return {"recommendations": [_recommendations(answer)]}
        answers = await worker.run(rec.recommend, body.histories, body.k, body.exclude_seen, body.exclude,
                                   body.unknown, body.fallback)
        return {"recommendations": [_recommendations(a) for a in answers]}

    @app.post(f"{prefix}/sessions/{{session_id}}/events", response_model=EventsResponse, responses=SESSION_ERRORS,
              tags=tags, summary="add events to a session (created on first use)", dependencies=[Depends(json_body)])
    async def add_events(session_id: SessionId, body: EventsRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        slot = resolve()
        rec = slot.served.rec
        known, missing = rec.items.ids(body.items)
        if missing and body.unknown == "error":
            rec.to_ids(body.items)  # raises, naming the unknown ids

        def add(session: Session) -> int:
            session.add_ids(known)
            return session.length

        async def apply(session: Session) -> int:
            return await worker.run(add, session)  # the model's steps, on the model's thread

        length = await slot.sessions.update(session_id, slot.run(worker), apply, lambda: worker.run(rec.session))
        return {"session": session_id, "length": length, "added": len(known), "dropped": missing}

    @app.get(f"{prefix}/sessions/{{session_id}}/recommendations", response_model=SessionRecommendations,
             responses=NO_SESSION, tags=tags, summary="top-k items after a session's events")
    async def session_recommendations(
            session_id: SessionId, k: K = default_k, exclude_seen: bool = False,
            exclude: Annotated[list[str], Query(max_length=max_exclude,
                                                description="item ids never to recommend (repeatable)")] = [],  # noqa: B006
            fallback: Annotated[Literal["popular"] | None, Query(
                description="answer a session without events with the most popular items")] = None,
            unknown: Annotated[Literal["error", "drop"], Query(
                description="an excluded item id the run never saw: a 422 naming it, or dropped")] = "error",
    ) -> dict[str, Any]:
        slot = resolve()
        session = await slot.sessions.read(session_id, slot.run(worker))
        if session is None:
            raise StarletteHTTPException(404, f"no session {session_id!r} (never created, deleted or expired)")
        with option_style("query"):
            answer = await worker.run(session.recommend, k, exclude_seen, exclude, fallback, unknown)
        return {"session": session_id, "length": session.length, "recommendations": _recommendations(answer)}

    @app.delete(f"{prefix}/sessions/{{session_id}}", response_model=Deleted, responses=NO_SESSION, tags=tags,
                summary="forget a session")
    async def delete_session(session_id: SessionId) -> dict[str, Any]:
        if not await resolve().sessions.remove(session_id):
            raise StarletteHTTPException(404, f"no session {session_id!r} (never created, deleted or expired)")
        return {"session": session_id, "deleted": True}


def _model_info(slot: Slot, default: str | None) -> dict[str, Any]:
    rec = slot.served.rec
    return {"name": slot.name, "model": rec.config.model, "dataset": str(rec.config.dataset),
            "run_dir": str(rec.run_dir) if rec.run_dir is not None else None, "items": rec.items.n_items,
            "fingerprint": rec.fingerprint[:16], "loaded_at": slot.served.loaded, "default": slot.name == default}


def _add_models(app: FastAPI, slots: dict[str, Slot], default: str | None) -> None:
    """GET /models, and POST /models/NAME/reload for each model."""

    @app.get("/models", response_model=ModelList, summary="the models served")
    async def models() -> dict[str, Any]:
        return {"default": default, "models": [_model_info(slot, default) for slot in slots.values()]}

    for name, slot in slots.items():
        def reloader(slot: Slot = slot):
            async def reload() -> dict[str, Any]:
                """Load the model's run directory again (a newer training published there), verified
                against its manifest, and serve it from now on; requests keep being answered meanwhile.
                A session made by the run before continues: its last L events are re-encoded by the new
                run when it is next used (the batch path on those items)."""
                before, after = await slot.reload()
                log.info("reloaded %s: %s -> %s", slot.name, before.rec.fingerprint[:16], after.rec.fingerprint[:16])
                return {"name": slot.name, "previous": before.rec.fingerprint[:16],
                        "model": _model_info(slot, default)}
            return reload

        app.post(f"/models/{name}/reload", response_model=Reloaded, tags=[name], summary="serve the run again",
                 responses={409: {"model": ErrorBody, "description": "the run cannot be loaded; the one before is "
                                                                     "still served"}})(reloader())


def _add_status(app: FastAPI, slots: dict[str, Slot], first: Slot, limits: dict[str, Any],
                registry: CollectorRegistry) -> None:
    """GET /health and /metrics."""

    @app.get("/health", response_model=Health, summary="the runs served and the live sessions")
    async def health() -> dict[str, Any]:
        rec = first.served.rec
        counts = [await slot.sessions.count() for slot in slots.values()]
        return {"status": "ok", "model": rec.config.model, "dataset": str(rec.config.dataset),
                "items": rec.items.n_items, "max_item_list_length": rec.max_seq_length, "streams": rec.streams,
                "sessions": None if None in counts else sum(counts), "session_store": app.state.session_store,
                "models": list(slots), "limits": limits}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format)")
    async def metrics() -> PlainTextResponse:
        """Requests by endpoint and status, a latency histogram, live and dropped sessions, batch sizes."""
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket for ``uvicorn.Server.run(sockets=[...])`` (port 0: a free one).

    Made with ``IPPROTO_TCP`` rather than by ``socket.create_server``: asyncio sets TCP_NODELAY
    only on connections whose socket says so, and without it each response waits ~40 ms for the
    client's delayed ACK between its header and body writes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlsa4rec")
    except PackageNotFoundError:
        return "unknown"
