"""The search API over HTTP: a FastAPI `APIRouter` the application mounts in its own app
(`build_router`), and the standalone service `embedding-pipeline serve` runs (`create_app`).

    POST /api/v1/semantic_search/{messages|topics|atoms}  {"query", "limit", "filters", "mode"}
    GET  /api/v1/similar/{table}/{id}?limit=&since=&until=&author=&topic=&extraction=&kind=
    GET  /api/v1/messages/{id}/atoms
    GET  /api/v1/topics/{id or key}/messages?limit=&since=&until=&author=&extraction=
    GET  /healthz                                          (open)
    GET  /metrics                                          (Prometheus text; the app only)

Every error is `{"detail": "<one line>"}` (422s add `"field"`): bad input 422 naming the
field, no or unknown API key 401, body too large 413, unknown row 404, model mismatch 409,
database or embedding provider down 503, a statement past `EP_API_STATEMENT_TIMEOUT_SECONDS`
504. No traceback, connection URL, password, API key, query text, filter value or
statement parameter ever reaches a response or the log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from embedding_pipeline.lib.embedders import EmbeddingError
from embedding_pipeline.lib.embedders.errors import InputRejectedError, TransientEmbeddingError
from embedding_pipeline.lib.store import db
from embedding_pipeline.search.api import Searcher, engine_for
from embedding_pipeline.search.auth import (
    UNAUTHORIZED,
    ApiKeys,
    RequireApiKey,
    Unauthorized,
    require_key,
)
from embedding_pipeline.search.errors import (
    InvalidQuery,
    ModelMismatch,
    NotFound,
    describe_errors,
)
from embedding_pipeline.search.filters import FILTER_NAMES, Filters
from embedding_pipeline.search.inputs import MAX_ID, MAX_KEY_CHARS
from embedding_pipeline.search.metrics import CONTENT_TYPE, ServiceMetrics
from embedding_pipeline.search.middleware import (
    BodyLimit,
    Observe,
    internal_error_body,
    log_unexpected,
    request_note,
    route_template,
)
from embedding_pipeline.search.types import MAX_LIMIT, Hit, Mode
from embedding_pipeline.settings import Settings, openai_api_key

log = logging.getLogger("embedding_pipeline.search")

Table = Literal["messages", "topics", "atoms"]
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT, description=f"results, 1 to {MAX_LIMIT}")]
RowId = Annotated[int, Path(ge=1, le=MAX_ID, description="row id")]


class SearchRequest(BaseModel):
    """The body of a semantic search."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(description="what to look for", examples=["bug fix"])
    limit: Limit = 10
    filters: Filters = Field(default_factory=Filters)
    mode: Mode = Field(default="vector", description="vector, text or hybrid")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class FilterParams(Filters):
    """The filters (and the result count) as query parameters."""

    limit: Limit = 10


class SearchResponse(BaseModel):
    results: list[Hit]
    model: str | None = Field(description="the model that embedded the query (None: text)")
    mode: str
    took_ms: float = Field(description="the whole request, embedding included")
    embed_ms: float | None = Field(default=None, description="embedding the query")


class Results(BaseModel):
    results: list[Hit]
    took_ms: float


class ErrorResponse(BaseModel):
    detail: str
    field: str | None = None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unreachable"]
    model: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "no API key, or an unknown one"},
    404: {"model": ErrorResponse, "description": "no such row"},
    409: {"model": ErrorResponse, "description": "the column holds another model's vectors"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    422: {"model": ErrorResponse, "description": "bad input; `field` names it"},
    503: {"model": ErrorResponse, "description": "database or embedding provider unavailable"},
    504: {"model": ErrorResponse, "description": "the search took too long"},
}
#: For unknown-field errors: which names were expected, by location.
KNOWN_FIELDS = {
    ("body",): tuple(SearchRequest.model_fields),
    ("body", "filters"): FILTER_NAMES,
    ("query",): tuple(FilterParams.model_fields),
}
#: Paths answered without an API key: health, and the API's description (it holds no
#: data, and a browser cannot send a key to load the docs page).
OPEN_PATHS = ("/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json")
#: How long a request waits for a free database connection before it is answered 503.
POOL_WAIT_SECONDS = 10.0
_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError)
_TIMEOUT = sa.select(sa.func.set_config("statement_timeout", sa.bindparam("ms"), sa.true()))
_TOO_LONG = ("57014", "55P03")  # query_canceled (statement timeout), lock_not_available


def _error(status: int, detail: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if field is not None:
        body["field"] = field
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(status_code=status, content=body, headers=headers)


def _error_route(scrub: Callable[[str], str], timeout_seconds: float) -> type[APIRoute]:
    """A route class that turns every failure into a one-line JSON error. Done per route
    (not with app exception handlers) so that the router behaves the same when the
    application mounts it in an app of its own."""

    class SearchRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    return _failure(exc, request, scrub, timeout_seconds)

            return guarded

    return SearchRoute


def _failure(
    exc: Exception, request: Request, scrub: Callable[[str], str], timeout_seconds: float
) -> JSONResponse:
    """The answer to a failed request; logged with its kind, never its values."""
    if isinstance(exc, RequestValidationError):
        invalid = describe_errors(exc.errors(), known_fields=KNOWN_FIELDS)
        return _error(422, str(invalid), invalid.field)
    if isinstance(exc, InvalidQuery):
        return _error(422, str(exc), exc.field)
    if isinstance(exc, HTTPException):  # FastAPI's: a body it could not decode as text
        if exc.status_code == 400:
            return _error(422, "body: invalid JSON (not UTF-8 text)", "body")
        return _error(exc.status_code, str(exc.detail))
    if isinstance(exc, Unauthorized):
        return _error(401, UNAUTHORIZED)
    if isinstance(exc, NotFound):
        return _error(404, str(exc))
    if isinstance(exc, ModelMismatch):
        return _error(409, str(exc))
    if isinstance(exc, InputRejectedError):
        log.warning("embedding provider refused the query (HTTP %s)", exc.status)
        return _error(422, "query: the embedding provider refused to embed it", "query")
    if isinstance(exc, EmbeddingError):
        kind = exc.kind if isinstance(exc, TransientEmbeddingError) else "refused"
        log.warning("embedding provider unavailable: %s (%s)", type(exc).__name__, kind)
        return _error(503, "the embedding provider is unavailable; try again later")
    if isinstance(exc, sa.exc.TimeoutError):
        log.warning("search busy: no database connection free within %gs", POOL_WAIT_SECONDS)
        return _error(503, "the search service is busy; try again later")
    if isinstance(exc, sa.exc.DBAPIError):
        answer = _database_error(exc, scrub, timeout_seconds)
        if answer is not None:
            return answer
    request_id = request_note(request).request_id
    log_unexpected(exc, request_id)
    return JSONResponse(status_code=500, content=internal_error_body(request_id))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _database_error(
    exc: sa.exc.DBAPIError, scrub: Callable[[str], str], timeout_seconds: float
) -> JSONResponse | None:
    """The answer to a database error, or None when it is not one the search expects.
    Only connection failures are logged with their message (it names no query value)."""
    code = getattr(exc.orig, "sqlstate", None) or ""
    kind = type(exc.orig).__name__
    if code in _TOO_LONG:
        log.warning("search took too long: %s (SQLSTATE %s)", kind, code)
        return _error(
            504,
            f"the search took too long (over {timeout_seconds:g} s); try a shorter query or "
            "narrower filters",
        )
    if code.startswith("54"):  # program_limit_exceeded: stack depth, statement too complex
        log.warning("search too complex for the database: %s (SQLSTATE %s)", kind, code)
        return _error(422, "query: too long or complex for the database to search", "query")
    if isinstance(exc, _UNAVAILABLE) or exc.connection_invalidated or code.startswith("08"):
        log.warning("database unavailable: %s", scrub(_first_line(exc.orig or exc)))
        return _error(503, "the database is unavailable; try again later")
    if code in ("42P01", "42703"):  # undefined table or column
        log.warning("search schema missing: %s (SQLSTATE %s)", kind, code)
        return _error(503, "search is not set up: run `embedding-pipeline schema` first")
    if code.startswith("22"):  # data exception: a value the database cannot take
        log.warning("database refused a request value: %s (SQLSTATE %s)", kind, code)
        return _error(422, "body: a value was refused by the database", "body")
    return None


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 2)


def build_router(
    searcher: Searcher,
    engine: sa.Engine,
    *,
    database_url: str | None = None,
    api_keys: ApiKeys | None = None,
    metrics: ServiceMetrics | None = None,
    timeout_per_request: bool = True,
) -> APIRouter:
    """The search routes over `engine`. With `api_keys`, every route but /healthz needs
    one of them (and OpenAPI declares the bearer scheme). Each request's statements run
    under `EP_API_STATEMENT_TIMEOUT_SECONDS`: set in each request's transaction, or, with
    `timeout_per_request` False, by the engine on its connections (`engine_for(...,
    statement_timeout=)`, one statement less per request). The password of `database_url`
    and of the engine's URL, and OPENAI_API_KEY, are removed from anything logged."""
    hidden = [s for s in (engine.url.password, openai_api_key()) if s]
    timeout_seconds = searcher.settings.api.statement_timeout_seconds

    def scrub(text: str) -> str:
        if database_url:
            text = db.redact(text, database_url)
        for secret in hidden:
            text = text.replace(secret, "***")
        return db.redact_url(text)

    router = APIRouter(route_class=_error_route(scrub, timeout_seconds), responses=ERRORS)
    protected = [Depends(require_key(api_keys))] if api_keys else []

    @contextmanager
    def connection(route: str) -> Iterator[sa.Connection]:
        """A pooled connection in a transaction whose statements may each run for at most
        the statement timeout; always rolled back."""
        started = time.perf_counter()
        try:
            with engine.connect() as conn:
                if timeout_per_request:
                    conn.execute(_TIMEOUT, {"ms": str(round(timeout_seconds * 1000))})
                yield conn
        finally:
            if metrics:
                metrics.database.labels(route).observe(time.perf_counter() - started)

    @router.post(
        "/api/v1/semantic_search/{table}",
        response_model=SearchResponse,
        tags=["search"],
        dependencies=protected,
    )
    def semantic_search(table: Table, body: SearchRequest, request: Request) -> SearchResponse:
        """The `limit` best rows of a table for `query`, by `mode`: `vector` (cosine
        similarity through the HNSW index), `text` (full text) or `hybrid` (reciprocal
        rank fusion of both), restricted by `filters`. The column's model is checked
        before the query is embedded."""
        started = time.perf_counter()
        request_note(request).query_chars = len(body.query)
        route = route_template(request.scope)
        query = searcher.prepare(
            body.query, table=table, k=body.limit, filters=body.filters, mode=body.mode
        )
        vector, embed_ms = None, None
        if query.needs_vector:
            if not searcher.model_matched_recently(table):
                with connection(route) as conn:
                    searcher.check_model(conn, table)
            embedding_started = time.perf_counter()
            vector = searcher.embed_query(query.text)
            embed_ms = _ms(embedding_started)
            if metrics:
                metrics.embedding.observe(embed_ms / 1000.0)
        with connection(route) as conn:
            hits = searcher.run(conn, query, vector)
        return SearchResponse(
            results=hits,
            model=searcher.model_id if query.needs_vector else None,
            mode=body.mode,
            took_ms=_ms(started),
            embed_ms=embed_ms,
        )

    @router.get(
        "/api/v1/similar/{table}/{id}",
        response_model=SearchResponse,
        tags=["search"],
        dependencies=protected,
    )
    def similar(
        table: Table, id: RowId, params: Annotated[FilterParams, Query()], request: Request
    ) -> SearchResponse:
        """The rows nearest to a stored row (itself excluded); nothing is embedded."""
        started = time.perf_counter()
        filters = Filters(**params.model_dump(exclude={"limit"}))
        with connection(route_template(request.scope)) as conn:
            hits = searcher.similar(conn, table, id, k=params.limit, filters=filters)
        return SearchResponse(results=hits, model=None, mode="vector", took_ms=_ms(started))

    @router.get(
        "/api/v1/messages/{id}/atoms",
        response_model=Results,
        tags=["lookups"],
        dependencies=protected,
    )
    def atoms_for_message(id: RowId, request: Request) -> Results:
        """The atoms extracted from a message."""
        started = time.perf_counter()
        with connection(route_template(request.scope)) as conn:
            hits = searcher.atoms_for_message(conn, id)
        return Results(results=hits, took_ms=_ms(started))

    @router.get(
        "/api/v1/topics/{topic}/messages",
        response_model=Results,
        tags=["lookups"],
        dependencies=protected,
    )
    def messages_for_topic(
        topic: Annotated[str, Path(max_length=MAX_KEY_CHARS, description="topic id or key")],
        params: Annotated[FilterParams, Query()],
        request: Request,
    ) -> Results:
        """A topic's messages, oldest first."""
        started = time.perf_counter()
        filters = Filters(**params.model_dump(exclude={"limit"}))
        with connection(route_template(request.scope)) as conn:
            hits = searcher.messages_for_topic(conn, topic, limit=params.limit, filters=filters)
        return Results(results=hits, took_ms=_ms(started))

    @router.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Response | Health:
        """`ok` when the database answers; 503 otherwise. Needs no API key."""
        try:
            with connection("/healthz") as conn:
                conn.execute(sa.select(1))
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
            reason = _first_line(exc.orig or exc) if isinstance(exc, sa.exc.DBAPIError) else "busy"
            log.warning("health check: database unreachable: %s", scrub(reason))
            body = Health(status="unavailable", database="unreachable", model=searcher.model_id)
            return JSONResponse(status_code=503, content=body.model_dump())
        return Health(status="ok", database="ok", model=searcher.model_id)

    return router


def create_app(
    settings: Settings,
    *,
    api_keys: Sequence[str] = (),
    searcher: Searcher | None = None,
    engine: sa.Engine | None = None,
) -> FastAPI:
    """The standalone search service: the router; with `api_keys`, a key required on
    everything but /healthz and the docs (checked before the body is read); /metrics;
    request ids, a private access log and metrics on every request; bodies bounded by
    `EP_API_MAX_BODY_BYTES`; CORS only for `EP_API_CORS_ORIGINS`; a connection pool of
    `EP_API_DB_POOL_SIZE`; the local model loaded before the first request, and the pool
    and the query embedding workers stopped at shutdown."""
    searcher = searcher or Searcher(settings)
    api = settings.api
    own_engine = engine is None
    engine = engine or engine_for(
        settings.effective_database_url,
        statement_timeout=api.statement_timeout_seconds,
        pool_size=api.db_pool_size,
        max_overflow=0,
        pool_timeout=POOL_WAIT_SECONDS,
    )
    keys = ApiKeys(api_keys)
    metrics = ServiceMetrics(searcher.query_vector_stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.embedder.provider == "local":
            with suppress(EmbeddingError):
                await asyncio.to_thread(searcher.embedder.embed, ["warm up"])
        yield
        searcher.close()
        engine.dispose()

    app = FastAPI(
        title="embedding_pipeline search",
        description=(
            "Semantic, full-text and hybrid search over messages, topics and atoms."
            + (" Every route but /healthz needs `Authorization: Bearer <key>`." if keys else "")
        ),
        version="1",
        lifespan=lifespan,
        redoc_url=None,
        # a path with a trailing slash is a 404 in JSON like any unknown path, not a 307
        # redirect with an empty body that a client would follow without its key
        redirect_slashes=False,
    )
    app.include_router(
        build_router(
            searcher,
            engine,
            database_url=settings.effective_database_url,
            api_keys=keys,
            metrics=metrics,
            timeout_per_request=not own_engine,
        )
    )

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # the last added runs first: Observe, CORS, keys, body limit, then the routes
    app.add_middleware(BodyLimit, max_bytes=api.max_body_bytes)
    if keys:
        app.add_middleware(RequireApiKey, keys=keys, open_paths=OPEN_PATHS)
    if api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(api.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(Observe, metrics=metrics)
    return app


def run_server(app: FastAPI, host: str, port: int, ready: str) -> bool:
    """Serve `app` with uvicorn (its access log off: it prints paths and query strings)
    until stopped; print `ready` on stdout once the socket listens. False when it never
    started (the port is taken, say)."""
    import uvicorn

    class ReadyServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(ready, flush=True)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)
    server = ReadyServer(config)
    server.run()
    return server.started
