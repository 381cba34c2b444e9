"""The HTTP service's ASGI middlewares: what must happen around every request, before FastAPI reads
it or after it answers (bearer tokens, CORS, a body size limit, the spelling of messages, request
metrics)."""

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Match

from mlsa4rec.serving.recommender import option_style

log = logging.getLogger("mlsa4rec")


NO_TOKEN = "this server needs a token: send the header Authorization: Bearer TOKEN"
BAD_TOKEN = "the token is not valid"


async def _send_json(send: Callable[..., Any], status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    response = JSONResponse(body, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def is_token(text: str) -> bool:
    """Whether ``text`` can be a bearer token: one word of visible ASCII (what a header carries intact)."""
    return bool(text) and all("!" <= c <= "~" for c in text)


class BearerAuth:
    """ASGI middleware: a request needs ``Authorization: Bearer TOKEN`` with one of ``tokens``, unless
    its path is open (``open_paths``, or under one of ``open_prefixes``); checked before the body is
    read, so nobody without a token makes the server read a body.

    The given token is compared with every token, each as a SHA-256 digest through
    ``hmac.compare_digest``: the time taken says neither which token nor how much of one matched,
    nor how long the tokens are. The scheme is case-insensitive (RFC 7235)."""

    def __init__(self, app: Any, tokens: Collection[str], open_paths: Collection[str] = (),
                 open_prefixes: Collection[str] = ()) -> None:
        if not tokens or not all(isinstance(t, str) and is_token(t) for t in tokens):
            raise ValueError("tokens must be one or more words of visible ASCII")
        self.app = app
        self.digests = [hashlib.sha256(t.encode("ascii")).digest() for t in tokens]
        self.open_paths = frozenset(open_paths)
        self.open_prefixes = tuple(open_prefixes)

    def is_open(self, scope: dict[str, Any]) -> bool:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # behind a proxy's prefix: the app's own path
            path = path[len(root):]
        return path in self.open_paths or path.startswith(self.open_prefixes)

    def allows(self, credentials: bytes) -> bool:
        scheme, _, token = credentials.partition(b" ")
        token = token.lstrip(b" ")
        if scheme.lower() != b"bearer" or not token or any(not 0x21 <= b <= 0x7E for b in token):
            return False
        given = hashlib.sha256(token).digest()
        matched = False
        for digest in self.digests:  # every one, without stopping at a match
            matched |= hmac.compare_digest(given, digest)
        return matched

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or self.is_open(scope):
            await self.app(scope, receive, send)
            return
        given = [value.strip(b" \t") for name, value in scope["headers"] if name.lower() == b"authorization"]
        if not given or given == [b""]:
            await _send_json(send, 401, {"error": NO_TOKEN}, {"WWW-Authenticate": "Bearer"})
        elif len(given) > 1 or not self.allows(given[0]):  # two headers: ambiguous, so neither counts
            await _send_json(send, 401, {"error": BAD_TOKEN}, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        else:
            await self.app(scope, receive, send)


class Cors(CORSMiddleware):
    """Starlette's CORS middleware, whose refused preflight is JSON ``{"error": ...}`` like every
    other error of the service, rather than plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse({"error": f"the CORS preflight is refused (not allowed: {refused}); the origins allowed "
                                      "are the server's --cors-origin flags"},
                            status_code=response.status_code, headers=headers)


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
