"""ASGI middleware of the standalone search service: one access-log line and the request
metrics per request (`Observe`), and a bounded request body (`BodyLimit`).

The access log is private by construction: it names the request id, method, route
template, status, duration and the query's length, never the path a client sent (topic
keys), the query string (filter values) or the body (query text). Uvicorn's own access
log, which prints paths and query strings, is switched off by `serve`.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedding_pipeline.search.auth import send_json
from embedding_pipeline.search.metrics import ServiceMetrics

access_log = logging.getLogger("embedding_pipeline.search.access")
log = logging.getLogger("embedding_pipeline.search")

#: Where a request's note lives in its ASGI scope.
NOTE_KEY = "embedding_pipeline.note"
#: A request id a client may choose (X-Request-ID); anything else is replaced.
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
UNMATCHED = "unmatched"


@dataclass
class RequestNote:
    """What the access log and the metrics say about a request, filled in on the way:
    its id, and the length of its query (the query itself is never kept)."""

    request_id: str
    query_chars: int | None = None


def request_note(request: HTTPConnection) -> RequestNote:
    """The request's note (a fresh one when no `Observe` middleware made it)."""
    note = request.scope.get(NOTE_KEY)
    if not isinstance(note, RequestNote):
        note = RequestNote(request_id=_new_request_id())
        request.scope[NOTE_KEY] = note
    return note


def _new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def route_template(scope: Scope) -> str:
    """The matched route's template, or `unmatched`."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED


def log_unexpected(exc: BaseException, request_id: str) -> None:
    """An unexpected failure, logged with where it happened but without its message: a
    message can hold the values of a statement or a request."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error(
        "request %s failed: %s (message withheld)\n%s", request_id, type(exc).__name__, frames
    )


def internal_error_body(request_id: str) -> dict[str, Any]:
    return {"detail": f"internal error; the server log names request {request_id}"}


class Observe:
    """Gives each request an id (the client's `X-Request-ID` when it is a plain token, sent
    back in the response header), counts it in flight, and once answered records its
    route, status and duration in the metrics and in one access-log line. An exception
    that reaches it is answered as a JSON 500 and logged without its message."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics | None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given.decode() if _CLIENT_REQUEST_ID.fullmatch(given) else _new_request_id()
        note = RequestNote(request_id=request_id)
        scope[NOTE_KEY] = note
        status = 500
        started = time.perf_counter()
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (b"x-request-id", request_id.encode()),
                    ],
                }
            await send(message)

        if self.metrics:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log_unexpected(exc, request_id)
            if not response_started:
                await send_json(send_with_id, 500, internal_error_body(request_id))
        finally:
            seconds = time.perf_counter() - started
            route, method = route_template(scope), scope["method"]
            if self.metrics:
                self.metrics.in_flight.dec()
                self.metrics.observe_request(route, method, status, seconds)
            query = "" if note.query_chars is None else f" query_chars={note.query_chars}"
            access_log.info(
                "request=%s %s %s %d %.1fms%s",
                request_id,
                method,
                route,
                status,
                seconds * 1000.0,
                query,
            )


class BodyLimit:
    """Refuses a request body larger than `max_bytes` with a JSON 413: at once when its
    Content-Length says so, else as soon as more than that has arrived. A body within the
    limit is read whole, then handed on."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        detail = f"body: the request body must be at most {self.max_bytes} bytes"
        await send_json(send, 413, {"detail": detail, "field": "body"})
