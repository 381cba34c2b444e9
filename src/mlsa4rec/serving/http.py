"""The HTTP service over a trained run (FastAPI): recommendations, live sessions, health, metrics.

    app = create_app(Recommender.from_run("runs/mamba4rec-beauty"))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # or: mlsa4rec serve --run-dir DIR

Endpoints (item ids are always the data file's own ids; the OpenAPI docs are at /docs):

    POST   /recommend                      {"histories": [[...], ...], "k": 10, "exclude_seen": false}
    POST   /sessions/{id}/events           {"items": ["i1", ...]}  (creates the session on first use)
    GET    /sessions/{id}/recommendations  ?k=10&exclude_seen=false
    DELETE /sessions/{id}
    GET    /health, /metrics (Prometheus text), /openapi.json, /docs

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
as the previous batch held, while a lone request never waits (see ``Batcher``);
``batch_window_ms=0`` scores every request alone. Sessions live in memory,
at most ``max_sessions`` (the least recently used is dropped first) and each for
``session_ttl_s`` after its last use (checked on every access and by a periodic sweep).

On SIGTERM (``mlsa4rec serve``) the server stops accepting connections, answers the requests in
flight, and exits 0; requests still unanswered after ``SHUTDOWN_GRACE_S`` are cancelled.
"""

import asyncio
import contextlib
import contextvars
import functools
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from mlsa4rec.errors import BrokenModelError, MLSA4RecError
from mlsa4rec.serving.recommender import Recommendation, Recommender, Session, flag, option_style

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
SHUTDOWN_GRACE_S = 10.0  # on SIGTERM, how long `mlsa4rec serve` waits for the requests in flight
MAX_ID_CHARS = 256  # the longest item id (string) a request may carry
SESSION_ID = r"^[A-Za-z0-9._~:@-]{1,128}$"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INTERNAL = "internal error; the server log has the details"
FASTAPI_UNREADABLE = "There was an error parsing the body"
UNREADABLE = "the body cannot be read as JSON (it is not UTF-8 text, or it is nested too deeply); send a JSON object"


def _item_id(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("an item id must be a string or an integer")
    if isinstance(value, str) and len(value) > MAX_ID_CHARS:
        raise ValueError(f"an item id has at most {MAX_ID_CHARS} characters")
    return value


ItemId = Annotated[Union[str, int], PlainValidator(_item_id),  # noqa: UP007 - pydantic reads this at runtime
                   WithJsonSchema({"anyOf": [{"type": "string", "maxLength": MAX_ID_CHARS}, {"type": "integer"}],
                                   "description": "an item id of the data file the run was trained on"})]


class RecommendationOut(BaseModel):
    item: Union[str, int] = Field(description="the data file's own item id")  # noqa: UP007
    score: float = Field(description="the model's score (a training-event count for the popularity fallback)")


class RecommendResponse(BaseModel):
    recommendations: list[list[RecommendationOut]] = Field(description="per history, the best items first")


class EventsResponse(BaseModel):
    session: str
    length: int = Field(description="events in the session so far")
    added: int = Field(description="events this request added")
    dropped: list[ItemId] = Field(description="unknown ids dropped (with unknown='drop')")


class SessionRecommendations(BaseModel):
    session: str
    length: int = Field(description="events in the session so far")
    recommendations: list[RecommendationOut] = Field(description="the best items first")


class Deleted(BaseModel):
    session: str
    deleted: bool


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    dataset: str
    items: int = Field(description="items the run knows (the largest k)")
    max_item_list_length: int = Field(description="L: the history length the model reads")
    streams: bool = Field(description="sessions keep a constant-size model state")
    sessions: int = Field(description="live sessions")
    limits: dict[str, Union[int, float]]  # noqa: UP007


class FieldError(BaseModel):
    field: str
    msg: str
    type: str


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong, in one line")
    detail: list[FieldError] | None = Field(None, description="validation errors: one per field")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "the body is not JSON"), (413, "the body is over the size limit"),
        (415, "the Content-Type header is not application/json"),
        (422, "a field, parameter or item id that cannot be used"))}


async def json_body(request: Request) -> None:
    """A POST body must say it is JSON: anything else is a 415 naming the header (rather than a 422
    about a body FastAPI then does not read)."""
    given = request.headers.get("content-type")
    main, _, sub = (given or "").split(";")[0].strip().lower().partition("/")
    if main != "application" or not (sub == "json" or sub.endswith("+json")):
        got = f"got {given!r:.80}" if given is not None else "it is missing"
        raise StarletteHTTPException(415, f"the request needs the header Content-Type: application/json ({got}), "
                                          "with a JSON body")


def _request_models(limits: dict[str, Any], n_items: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request bodies, with this app's limits in their schema (and so in the OpenAPI docs)."""
    length = limits["max_history_length"]
    max_k = min(limits["max_k"], n_items)
    History = Annotated[list[ItemId], Field(max_length=length)]  # noqa: N806

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
            "examples": [{"histories": [["i1", "i2", "i3"]], "k": 10, "exclude_seen": False}]})
        histories: list[History] = Field(min_length=1, max_length=limits["max_histories"],
                                         description="histories of item ids, oldest first")
        k: int = Field(min(10, max_k), ge=1, le=max_k, description="items per history (default 10, or every "
                       "item the run knows if fewer)")
        exclude_seen: bool = Field(False, description="never recommend an item of the history")
        exclude: list[ItemId] = Field([], max_length=length, description="item ids never to recommend")
        unknown: Literal["error", "drop"] = Field(
            "error", description="an item id the run never saw: a 422 naming it, or dropped")
        fallback: Literal["popular"] | None = Field(
            None, description="answer an empty history with the most popular training items")

    class EventsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
            "examples": [{"items": ["i7"]}, {"items": ["i1", "i2"], "unknown": "drop"}]})
        items: list[ItemId] = Field(min_length=1, max_length=length, description="the new events, oldest first")
        unknown: Literal["error", "drop"] = Field(
            "error", description="an item id the run never saw: a 422 naming it, or dropped")

    return RecommendRequest, EventsRequest


# --- sessions ----------------------------------------------------------------------------------------
@dataclass
class _Entry:
    session: Session
    used: float


class SessionStore:
    """Live sessions by id: least recently used first, dropped beyond ``cap`` or after ``ttl_s`` idle."""

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


# --- micro-batching ------------------------------------------------------------------------------
@dataclass
class _Pending:
    ids: list[int]
    k: int
    exclude_seen: bool
    exclude: list[Any]
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Merges single-history requests into one ``Recommender.scores`` call (at most ``max_batch``);
    each request is then ranked with its own k and exclusions.

    A batch takes every request queued while the model was busy with the previous one, and waits
    (at most ``window_s``) until as many have arrived as the previous batch held: under concurrent
    load the batches keep their size, while a lone request (the last batch was a single one)
    never waits, so batching costs no latency when there is nothing to merge.
    """

    def __init__(self, rec: Recommender, run: Callable[..., Any], window_s: float, max_batch: int,
                 sizes: Histogram) -> None:
        self.rec = rec
        self.run = run
        self.window_s = window_s
        self.max_batch = max_batch
        self.sizes = sizes
        self.queue: asyncio.Queue[_Pending] | None = None
        self._full: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._target = 0  # queued requests the current batch waits for
        self._batch: list[_Pending] = []  # the batch being scored

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._full = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        waiting = list(self._batch)
        while self.queue is not None and not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(StarletteHTTPException(503, "the server is shutting down"))

    async def submit(self, ids: list[int], k: int, exclude_seen: bool, exclude: list[Any]) -> list[Recommendation]:
        assert self.queue is not None and self._full is not None
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Pending(ids, k, exclude_seen, exclude, future))
        if self.queue.qsize() >= self._target:
            self._full.set()
        return await future

    async def _loop(self) -> None:
        assert self.queue is not None and self._full is not None
        last = 1
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(0)  # requests already read by this turn of the loop join
            # under concurrent load, wait (at most the window) for as many requests as the last batch had
            self._target = min(last, self.max_batch) - 1
            if self.queue.qsize() < self._target:
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), self.window_s)
                except asyncio.TimeoutError:
                    pass
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            last = len(batch)
            batch = self._batch = [p for p in batch if not p.future.done()]  # minus clients that went away
            if not batch:
                continue
            self.sizes.observe(len(batch))
            try:
                answers = await self.run(self._score, batch)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
            else:
                for pending, answer in zip(batch, answers):
                    if not pending.future.done():
                        pending.future.set_result(answer)

    def _score(self, batch: list[_Pending]) -> list[list[Recommendation]]:
        scores = self.rec.scores([p.ids for p in batch])
        return [self.rec.top_k(scores[row:row + 1], p.k, [p.ids] if p.exclude_seen else None, p.exclude)[0]
                for row, p in enumerate(batch)]


# --- middleware ------------------------------------------------------------------------------------
async def _send_json(send: Callable[..., Any], status: int, body: dict[str, Any]) -> None:
    response = JSONResponse(body, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (declared or streamed) gets 413 unread."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = {"error": f"the request body is over the limit of {self.max_bytes} bytes"}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_json(send, 400, {"error": "the Content-Length header is not a number"})
                return
            if size > self.max_bytes:
                await _send_json(send, 413, too_big)
                return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await _send_json(send, 413, too_big)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class JsonSpelling:
    """ASGI middleware: while a request runs, messages name settings as JSON fields
    (``"unknown": "drop"``), as the request writes them, rather than as Python keywords."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with option_style("json"):
            await self.app(scope, receive, send)


class Metrics:
    """ASGI middleware: requests by endpoint (the route's template), method and status, and latency."""

    def __init__(self, app: Any, router: Any, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.router = router
        self.requests = requests
        self.latency = latency

    def endpoint(self, scope: dict[str, Any]) -> str:
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return route.path
        return "other"

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, started = time.perf_counter(), 500, False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when its graceful shutdown times out (SIGTERM): the client
            # gets a 503 if nothing was sent yet, and the log one line rather than a traceback
            log.warning("%s %s was cut off by the shutdown", scope["method"], scope.get("path", ""))
            if not started:
                status = 503
                with contextlib.suppress(Exception):
                    await _send_json(send, 503, {"error": "the server is shutting down; send the request again"})
        finally:
            endpoint = self.endpoint(scope)
            self.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - start)


# --- the app ------------------------------------------------------------------------------------------
LIMIT_MAX = 2 ** 31 - 1


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


def _field(loc: tuple[Any, ...]) -> str:
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def _recommendations(recs: list[Recommendation]) -> list[dict[str, Any]]:
    return [{"item": r.item, "score": r.score} for r in recs]


def create_app(recommender: Recommender, *, max_body_bytes: int = DEFAULTS["max_body_bytes"],
               max_histories: int = DEFAULTS["max_histories"],
               max_history_length: int = DEFAULTS["max_history_length"], max_k: int = DEFAULTS["max_k"],
               max_sessions: int = DEFAULTS["max_sessions"], session_ttl_s: float = DEFAULTS["session_ttl_s"],
               batch_window_ms: float = DEFAULTS["batch_window_ms"], max_batch: int = DEFAULTS["max_batch"]) -> FastAPI:
    """A FastAPI app serving ``recommender``; the limits are described in the module docstring."""
    rec = recommender
    limits = {"max_body_bytes": max_body_bytes, "max_histories": max_histories,
              "max_history_length": max_history_length, "max_k": max_k, "max_sessions": max_sessions,
              "session_ttl_s": session_ttl_s, "batch_window_ms": batch_window_ms, "max_batch": max_batch}
    _check_limits(limits)
    RecommendRequest, EventsRequest = _request_models(limits, rec.items.n_items)  # noqa: N806
    k_limit = min(max_k, rec.items.n_items)

    registry = CollectorRegistry()
    requests = Counter("mlsa4rec_http_requests", "HTTP requests by endpoint, method and status",
                       ["endpoint", "method", "status"], registry=registry)
    latency = Histogram("mlsa4rec_http_request_duration_seconds", "HTTP request latency by endpoint",
                        ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
    live = Gauge("mlsa4rec_sessions", "live sessions", registry=registry)
    dropped = Counter("mlsa4rec_sessions_dropped", "sessions dropped: lru (over max_sessions) or idle (ttl)",
                      ["reason"], registry=registry)
    sizes = Histogram("mlsa4rec_batch_size", "histories per merged model call of single-history requests",
                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
    sessions = SessionStore(max_sessions, session_ttl_s, live, dropped)

    worker: dict[str, ThreadPoolExecutor | None] = {"pool": None}

    def pool() -> ThreadPoolExecutor:
        if worker["pool"] is None:
            worker["pool"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlsa4rec-model")
        return worker["pool"]

    async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on the model's one worker thread (in the caller's context: its messages' spelling)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(pool(), call)

    batcher = Batcher(rec, run, batch_window_ms / 1000, max_batch, sizes) if batch_window_ms > 0 else None

    async def sweeper() -> None:
        period = max(0.05, min(session_ttl_s / 2, 30.0))
        while True:
            await asyncio.sleep(period)
            sessions.sweep()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool()
        if batcher is not None:
            batcher.start()
        sweep = asyncio.get_running_loop().create_task(sweeper())
        try:
            yield
        finally:
            sweep.cancel()
            if batcher is not None:
                await batcher.stop()
            executor, worker["pool"] = worker["pool"], None
            if executor is not None:
                executor.shutdown(wait=False)

    model, dataset = str(rec.config["model"]), str(rec.config["dataset"])
    app = FastAPI(title="mlsa4rec", version=_version(), lifespan=lifespan,
                  description=f"Recommendations of the {model} run "
                              f"{rec.run_dir.name if rec.run_dir else ''} trained on {dataset}, in the data "
                              "file's own item ids. Errors are JSON {\"error\": \"...\"}.")
    app.state.recommender, app.state.sessions, app.state.limits, app.state.registry = rec, sessions, limits, registry

    # --- errors: always one JSON line, never a traceback ---
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
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

    @app.exception_handler(MLSA4RecError)
    async def unusable(request: Request, exc: MLSA4RecError) -> JSONResponse:
        broken = isinstance(exc, BrokenModelError)  # the run is at fault, not the request
        if broken:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__},
                            status_code=500 if broken else 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == FASTAPI_UNREADABLE:  # FastAPI's words for any decoding failure
            detail = UNREADABLE
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": INTERNAL}, status_code=500)

    # --- endpoints ---
    SessionId = Annotated[str, PathParam(pattern=SESSION_ID, description="any id of 1-128 letters, digits, ._~:@-")]  # noqa: N806
    K = Annotated[int, Query(ge=1, le=k_limit, description="how many items")]  # noqa: N806
    default_k = min(10, k_limit)  # a run with fewer than 10 items answers with all of them

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
        answers = await run(rec.recommend, body.histories, body.k, body.exclude_seen, body.exclude, body.unknown,
                            body.fallback)
        return {"recommendations": [_recommendations(a) for a in answers]}

    @app.post("/sessions/{session_id}/events", response_model=EventsResponse, responses=ERRORS,
              summary="add events to a session (created on first use)", dependencies=[Depends(json_body)])
    async def add_events(session_id: SessionId, body: EventsRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        known, missing = rec.items.ids(body.items)
        if missing and body.unknown == "error":
            rec.to_ids(body.items)  # raises, naming the unknown ids
        session = sessions.get(session_id)
        if session is None:
            session = await run(rec.session)  # its initial model state, made on the model's thread
            earlier = sessions.get(session_id)  # a request for the same id that got there first
            if earlier is not None:
                session = earlier
            else:
                sessions.put(session_id, session)

        def add() -> int:
            session.add_ids(known)
            return session.length

        length = await run(add)
        return {"session": session_id, "length": length, "added": len(known), "dropped": missing}

    @app.get("/sessions/{session_id}/recommendations", response_model=SessionRecommendations,
             responses={404: {"model": ErrorBody, "description": "no such session (or it expired)"},
                        422: ERRORS[422]},
             summary="top-k items after a session's events")
    async def session_recommendations(
            session_id: SessionId, k: K = default_k, exclude_seen: bool = False,
            exclude: Annotated[list[str], Query(max_length=max_history_length,
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
            answer = await run(session.recommend, k, exclude_seen, exclude, fallback, unknown)
        return {"session": session_id, "length": session.length, "recommendations": _recommendations(answer)}

    @app.delete("/sessions/{session_id}", response_model=Deleted,
                responses={404: {"model": ErrorBody, "description": "no such session (or it expired)"},
                           422: ERRORS[422]},
                summary="forget a session")
    async def delete_session(session_id: SessionId) -> dict[str, Any]:
        if not sessions.delete(session_id):
            raise StarletteHTTPException(404, f"no session {session_id!r} (never created, deleted or expired)")
        return {"session": session_id, "deleted": True}

    @app.get("/health", response_model=Health, summary="the run served and the live sessions")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model, "dataset": dataset, "items": rec.items.n_items,
                "max_item_list_length": rec.max_length, "streams": rec.streams, "sessions": len(sessions),
                "limits": limits}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format)")
    async def metrics() -> PlainTextResponse:
        """Requests by endpoint and status, a latency histogram, live and dropped sessions, batch sizes."""
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(JsonSpelling)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(Metrics, router=app.router, requests=requests, latency=latency)  # outermost: counts 413s
    return app


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
