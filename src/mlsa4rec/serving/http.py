"""The HTTP service over a trained run (FastAPI): recommendations, live sessions, health, metrics.

    app = create_app(Recommender.from_run("runs/mamba4rec-beauty"))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # or: mlsa4rec serve --run-dir DIR

Endpoints (item ids are always the data file's own ids; the OpenAPI docs are at /docs):

    POST   /recommend                      {"histories": [[...], ...], "k": 10, "exclude_seen": false}
    POST   /sessions/{id}/events           {"items": ["i1", ...]}  (creates the session on first use)
    GET    /sessions/{id}/recommendations  ?k=10&exclude_seen=false
    DELETE /sessions/{id}
    GET    /health, /metrics (Prometheus text), /openapi.json, /docs, /redoc

Every error is JSON ``{"error": "one line"}`` (validation errors add ``detail``, one entry per
field): 422 for a body or parameter that cannot be used (naming the field, or the unknown item
ids), 400 for a body that is not JSON, 415 for a POST without ``Content-Type: application/json``,
404 for an unknown session, 413 for a body over the limit.
An unexpected failure is a 500 ``{"error": "internal error ..."}``, never a traceback (that goes
to the server log).

Model calls run one at a time on a single worker thread, so the event loop stays free and the
model is never entered from two threads. Single-history ``/recommend`` calls that queue while the
model is busy are scored together in one model call (``max_batch`` at most), each then ranked on
its own; under concurrent load a batch also waits up to ``batch_window_ms`` for as many requests
as the previous batch held, while a lone request never waits (see ``batcher.Batcher``);
``batch_window_ms=0`` scores every request alone. Sessions live in memory,
at most ``max_sessions`` (the least recently used is dropped first) and each for
``session_ttl_s`` after its last use (checked on every access and by a periodic sweep).

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
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount

from mlsa4rec.errors import BrokenModelError, MLSA4RecError
from mlsa4rec.serving.batcher import Batcher, ModelWorker
from mlsa4rec.serving.middleware import BearerAuth, BodyLimit, Cors, JsonSpelling, Metrics, is_token
from mlsa4rec.serving.recommender import Recommendation, Recommender, flag, option_style
from mlsa4rec.serving.schemas import (
    ERRORS,
    SESSION_ID,
    Deleted,
    ErrorBody,
    EventsResponse,
    Health,
    RecommendResponse,
    SessionRecommendations,
    request_models,
)
from mlsa4rec.serving.sessions import Sessions, SessionStore

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
NO_SESSION = {404: {"model": ErrorBody, "description": "no such session (or it expired)"}, 422: ERRORS[422]}


def create_app(recommender: Recommender, *, max_body_bytes: int = DEFAULTS["max_body_bytes"],
               max_histories: int = DEFAULTS["max_histories"],
               max_history_length: int = DEFAULTS["max_history_length"], max_k: int = DEFAULTS["max_k"],
               max_sessions: int = DEFAULTS["max_sessions"], session_ttl_s: float = DEFAULTS["session_ttl_s"],
               batch_window_ms: float = DEFAULTS["batch_window_ms"], max_batch: int = DEFAULTS["max_batch"],
               tokens: Collection[str] | None = ACCESS_DEFAULTS["tokens"],
               metrics_public: bool = ACCESS_DEFAULTS["metrics_public"],
               docs_public: bool = ACCESS_DEFAULTS["docs_public"],
               cors_origins: Collection[str] = ACCESS_DEFAULTS["cors_origins"]) -> FastAPI:
    """A FastAPI app serving ``recommender``; the limits and the access settings are described in
    the module docstring."""
    rec = recommender
    limits = {"max_body_bytes": max_body_bytes, "max_histories": max_histories,
              "max_history_length": max_history_length, "max_k": max_k, "max_sessions": max_sessions,
              "session_ttl_s": session_ttl_s, "batch_window_ms": batch_window_ms, "max_batch": max_batch}
    _check_limits(limits)
    allowed, origins = _check_access(tokens, metrics_public, docs_public, cors_origins)
    RecommendRequest, EventsRequest = request_models(limits, rec.items.n_items)  # noqa: N806
    meters = _Meters.create()
    worker = ModelWorker()
    batcher = (Batcher(rec, worker.run, batch_window_ms / 1000, max_batch, meters.batch_sizes)
               if batch_window_ms > 0 else None)
    sessions = SessionStore(max_sessions, session_ttl_s, meters.live, meters.dropped)

    # /docs and /redoc load their scripts from the installed package, so they work without the internet
    app = FastAPIOffline(title="mlsa4rec", version=_version(), lifespan=_lifespan, exception_handlers=ERROR_HANDLERS,
                         description=f"Recommendations of the {rec.config.model} run "
                                     f"{rec.run_dir.name if rec.run_dir else ''} trained on {rec.config.dataset}, in "
                                     "the data file's own item ids. Errors are JSON {\"error\": \"...\"}.")
    app.state.recommender, app.state.sessions, app.state.limits = rec, sessions, limits
    app.state.access = {"tokens": len(allowed), "metrics_public": metrics_public, "docs_public": docs_public,
                        "cors_origins": origins}  # what is open, for the server's log; never the tokens
    app.state.registry, app.state.worker, app.state.batcher = meters.registry, worker, batcher

    _add_recommend(app, rec, worker, batcher, RecommendRequest)
    _add_sessions(app, rec, worker, sessions, EventsRequest, k_limit=min(max_k, rec.items.n_items),
                  max_exclude=max_history_length)
    _add_status(app, rec, sessions, limits, meters.registry)

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


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the app runs: the model's worker thread, the batcher and the periodic session sweep."""
    worker: ModelWorker = app.state.worker
    batcher: Batcher | None = app.state.batcher
    worker.start()
    if batcher is not None:
        batcher.start()
    sweep = asyncio.get_running_loop().create_task(_sweeper(app.state.sessions, app.state.limits["session_ttl_s"]))
    try:
        yield
    finally:
        sweep.cancel()
        if batcher is not None:
            await batcher.stop()
        worker.stop()


async def _sweeper(sessions: Sessions, ttl_s: float) -> None:
    period = max(0.05, min(ttl_s / 2, 30.0))
    while True:
        await asyncio.sleep(period)
        sessions.sweep()


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


async def _unusable(request: Request, exc: MLSA4RecError) -> JSONResponse:
    broken = isinstance(exc, BrokenModelError)  # the run is at fault, not the request
    if broken:
        log.error("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__},
                        status_code=500 if broken else 422)


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


def _add_recommend(app: FastAPI, rec: Recommender, worker: ModelWorker, batcher: Batcher | None,
                   RecommendRequest: type[BaseModel]) -> None:  # noqa: N803
    """POST /recommend: merged by ``batcher`` when it runs and the request has one history."""

    @app.post("/recommend", response_model=RecommendResponse, responses=ERRORS, summary="top-k items per history",
              dependencies=[Depends(json_body)])
    async def recommend(body: RecommendRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """The ``k`` best items for each history (item ids of the data file, oldest first), scored as
        the evaluation scores a test user (the last L items)."""
        if batcher is not None and batcher.running and len(body.histories) == 1:
            ids = rec.to_ids(body.histories[0], body.unknown)
            if ids:  # exclusions are checked here, so a bad one never fails the merged model call
                exclude = [rec.items.token(i) for i in rec.exclude_ids(body.exclude, body.unknown)]
                answer = await batcher.submit(ids, body.k, body.exclude_seen, exclude)
                return {"recommendations": [_recommendations(answer)]}
        answers = await worker.run(rec.recommend, body.histories, body.k, body.exclude_seen, body.exclude,
                                   body.unknown, body.fallback)
        return {"recommendations": [_recommendations(a) for a in answers]}


def _add_sessions(app: FastAPI, rec: Recommender, worker: ModelWorker, sessions: Sessions,
                  EventsRequest: type[BaseModel], k_limit: int, max_exclude: int) -> None:  # noqa: N803
    """/sessions/{session_id}/...: add events, recommend after them, forget the session."""

    SessionId = Annotated[str, PathParam(pattern=SESSION_ID, description="any id of 1-128 letters, digits, ._~:@-")]  # noqa: N806
    K = Annotated[int, Query(ge=1, le=k_limit, description="how many items")]  # noqa: N806
    default_k = min(10, k_limit)  # a run with fewer than 10 items answers with all of them

    @app.post("/sessions/{session_id}/events", response_model=EventsResponse, responses=ERRORS,
              summary="add events to a session (created on first use)", dependencies=[Depends(json_body)])
    async def add_events(session_id: SessionId, body: EventsRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        known, missing = rec.items.ids(body.items)
        if missing and body.unknown == "error":
            rec.to_ids(body.items)  # raises, naming the unknown ids
        session = sessions.get(session_id)
        if session is None:
            session = await worker.run(rec.session)  # its initial model state, made on the model's thread
            earlier = sessions.get(session_id)  # a request for the same id that got there first
            if earlier is not None:
                session = earlier
            else:
                sessions.put(session_id, session)

        def add() -> int:
            session.add_ids(known)
            return session.length

        length = await worker.run(add)
        return {"session": session_id, "length": length, "added": len(known), "dropped": missing}

    @app.get("/sessions/{session_id}/recommendations", response_model=SessionRecommendations, responses=NO_SESSION,
             summary="top-k items after a session's events")
    async def session_recommendations(
            session_id: SessionId, k: K = default_k, exclude_seen: bool = False,
            exclude: Annotated[list[str], Query(max_length=max_exclude,
                                                description="item ids never to recommend (repeatable)")] = [],  # noqa: B006
            fallback: Annotated[Literal["popular"] | None, Query(
                description="answer a session without events with the most popular items")] = None,
            unknown: Annotated[Literal["error", "drop"], Query(
                description="an excluded item id the run never saw: a 422 naming it, or dropped")] = "error",
    ) -> dict[str, Any]:
        session = sessions.get(session_id)
        if session is None:
            raise StarletteHTTPException(404, f"no session {session_id!r} (never created, deleted or expired)")
        with option_style("query"):
            answer = await worker.run(session.recommend, k, exclude_seen, exclude, fallback, unknown)
        return {"session": session_id, "length": session.length, "recommendations": _recommendations(answer)}

    @app.delete("/sessions/{session_id}", response_model=Deleted, responses=NO_SESSION, summary="forget a session")
    async def delete_session(session_id: SessionId) -> dict[str, Any]:
        if not sessions.delete(session_id):
            raise StarletteHTTPException(404, f"no session {session_id!r} (never created, deleted or expired)")
        return {"session": session_id, "deleted": True}


def _add_status(app: FastAPI, rec: Recommender, sessions: Sessions, limits: dict[str, Any],
                registry: CollectorRegistry) -> None:
    """GET /health and /metrics."""

    model, dataset = rec.config.model, str(rec.config.dataset)

    @app.get("/health", response_model=Health, summary="the run served and the live sessions")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model, "dataset": dataset, "items": rec.items.n_items,
                "max_item_list_length": rec.max_seq_length, "streams": rec.streams, "sessions": len(sessions),
                "limits": limits}

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
