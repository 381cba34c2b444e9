"""The HTTP service's ASGI middlewares: what must happen around every request, before FastAPI reads
it or after it answers (a body size limit, the spelling of messages, request metrics)."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from starlette.routing import Match

from mlsa4rec.serving.recommender import option_style

log = logging.getLogger("mlsa4rec")


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
