"""The search API over HTTP: a FastAPI `APIRouter` the application mounts in its own app
(`build_router`), and the standalone app `embedding-pipeline serve` runs (`create_app`).

    POST /api/v1/semantic_search/{messages|topics|atoms}  {"query", "limit", "filters", "mode"}
    GET  /api/v1/similar/{table}/{id}?limit=&since=&until=&author=&topic=&extraction=&kind=
    GET  /api/v1/messages/{id}/atoms
    GET  /api/v1/topics/{id or key}/messages?limit=&since=&until=&author=&extraction=
    GET  /healthz

Every error is `{"detail": "<one line>"}` (422s add `"field"`): bad input 422 naming the
field, unknown row 404, model mismatch 409, database or embedding provider down 503. No
traceback, connection URL, password or API key ever reaches a response or the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator

from embedding_pipeline.lib import db
from embedding_pipeline.lib.embedders import EmbeddingError
from embedding_pipeline.search.api import MAX_LIMIT, Hit, Mode, Searcher, engine_for
from embedding_pipeline.search.errors import (
    InvalidQuery,
    ModelMismatch,
    NotFound,
    describe_errors,
)
from embedding_pipeline.search.filters import FILTER_NAMES, Filters
from embedding_pipeline.settings import Settings, openai_api_key

log = logging.getLogger("embedding_pipeline.search")

Table = Literal["messages", "topics", "atoms"]
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT, description=f"results, 1 to {MAX_LIMIT}")]


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
    404: {"model": ErrorResponse, "description": "no such row"},
    409: {"model": ErrorResponse, "description": "the column holds another model's vectors"},
    422: {"model": ErrorResponse, "description": "bad input; `field` names it"},
    503: {"model": ErrorResponse, "description": "database or embedding provider unavailable"},
}
#: For unknown-field errors: which names were expected, by location.
KNOWN_FIELDS = {
    ("body",): tuple(SearchRequest.model_fields),
    ("body", "filters"): FILTER_NAMES,
    ("query",): tuple(FilterParams.model_fields),
}
_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


def _error(status: int, detail: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if field is not None:
        body["field"] = field
    return JSONResponse(status_code=status, content=body)


def _error_route(scrub: Callable[[str], str]) -> type[APIRoute]:
    """A route class that turns every known failure into a one-line JSON error. Done per
    route (not with app exception handlers) so that the router behaves the same when the
    application mounts it in an app of its own."""

    class SearchRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    invalid = describe_errors(exc.errors(), known_fields=KNOWN_FIELDS)
                    return _error(422, str(invalid), invalid.field)
                except InvalidQuery as exc:
                    return _error(422, str(exc), exc.field)
                except NotFound as exc:
                    return _error(404, str(exc))
                except ModelMismatch as exc:
                    return _error(409, str(exc))
                except EmbeddingError as exc:
                    log.warning("embedding provider unavailable: %s", scrub(_first_line(exc)))
                    return _error(503, "the embedding provider is unavailable; try again later")
                except sa.exc.DBAPIError as exc:
                    return _database_error(exc, scrub)
                except sa.exc.TimeoutError:
                    log.warning("database unavailable: no connection free in the pool")
                    return _error(503, "the database is unavailable; try again later")

            return guarded

    return SearchRoute


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _database_error(exc: sa.exc.DBAPIError, scrub: Callable[[str], str]) -> JSONResponse:
    reason = _first_line(exc.orig or exc)
    code = getattr(exc.orig, "sqlstate", None) or ""
    if isinstance(exc, _UNAVAILABLE) or exc.connection_invalidated or code.startswith("08"):
        log.warning("database unavailable: %s", scrub(reason))
        return _error(503, "the database is unavailable; try again later")
    if code in ("42P01", "42703"):  # undefined table or column
        log.warning("search schema missing: %s", scrub(reason))
        return _error(503, "search is not set up: run `embedding-pipeline schema` first")
    raise exc


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 2)


def build_router(
    searcher: Searcher, engine: sa.Engine, *, database_url: str | None = None
) -> APIRouter:
    """The search routes over `engine`. The password of `database_url` and of the engine's
    URL, and OPENAI_API_KEY, are removed from anything logged."""
    hidden = [s for s in (engine.url.password, openai_api_key()) if s]

    def scrub(text: str) -> str:
        if database_url:
            text = db.redact(text, database_url)
        for secret in hidden:
            text = text.replace(secret, "***")
        return db.redact_url(text)

    router = APIRouter(route_class=_error_route(scrub), responses=ERRORS)

    @router.post("/api/v1/semantic_search/{table}", response_model=SearchResponse, tags=["search"])
    def semantic_search(table: Table, body: SearchRequest) -> SearchResponse:
        """The `limit` best rows of a table for `query`, by `mode`: `vector` (cosine
        similarity through the HNSW index), `text` (full text) or `hybrid` (reciprocal
        rank fusion of both), restricted by `filters`."""
        started = time.perf_counter()
        vector, embed_ms = None, None
        if body.mode != "text":
            vector = searcher.embed_query(body.query.strip())
            embed_ms = _ms(started)
        with engine.connect() as conn:
            hits = searcher.search(
                conn,
                body.query,
                table=table,
                k=body.limit,
                filters=body.filters,
                mode=body.mode,
                vector=vector,
            )
        return SearchResponse(
            results=hits,
            model=None if body.mode == "text" else searcher.model_id,
            mode=body.mode,
            took_ms=_ms(started),
            embed_ms=embed_ms,
        )

    @router.get("/api/v1/similar/{table}/{id}", response_model=SearchResponse, tags=["search"])
    def similar(
        table: Table, id: Annotated[int, Path(ge=1)], params: Annotated[FilterParams, Query()]
    ) -> SearchResponse:
        """The rows nearest to a stored row (itself excluded); nothing is embedded."""
        started = time.perf_counter()
        filters = Filters(**params.model_dump(exclude={"limit"}))
        with engine.connect() as conn:
            hits = searcher.similar(conn, table, id, k=params.limit, filters=filters)
        return SearchResponse(results=hits, model=None, mode="vector", took_ms=_ms(started))

    @router.get("/api/v1/messages/{id}/atoms", response_model=Results, tags=["lookups"])
    def atoms_for_message(id: Annotated[int, Path(ge=1)]) -> Results:
        """The atoms extracted from a message."""
        started = time.perf_counter()
        with engine.connect() as conn:
            hits = searcher.atoms_for_message(conn, id)
        return Results(results=hits, took_ms=_ms(started))

    @router.get("/api/v1/topics/{topic}/messages", response_model=Results, tags=["lookups"])
    def messages_for_topic(
        topic: Annotated[str, Path(description="topic id or key")],
        params: Annotated[FilterParams, Query()],
    ) -> Results:
        """A topic's messages, oldest first."""
        started = time.perf_counter()
        filters = Filters(**params.model_dump(exclude={"limit"}))
        key: int | str = int(topic) if topic.isdigit() else topic
        with engine.connect() as conn:
            hits = searcher.messages_for_topic(conn, key, limit=params.limit, filters=filters)
        return Results(results=hits, took_ms=_ms(started))

    @router.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Response | Health:
        """`ok` when the database answers; 503 otherwise."""
        try:
            with engine.connect() as conn:
                conn.execute(sa.select(1))
        except sa.exc.DBAPIError as exc:
            log.warning(
                "health check: database unreachable: %s", scrub(_first_line(exc.orig or exc))
            )
            body = Health(status="unavailable", database="unreachable", model=searcher.model_id)
            return JSONResponse(status_code=503, content=body.model_dump())
        return Health(status="ok", database="ok", model=searcher.model_id)

    return router


def create_app(
    settings: Settings, *, searcher: Searcher | None = None, engine: sa.Engine | None = None
) -> FastAPI:
    """The standalone search service: the router, OpenAPI docs at /docs, the local model
    loaded before the first request, and the connection pool closed at shutdown."""
    searcher = searcher or Searcher(settings)
    engine = engine or engine_for(settings.effective_database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.embedder.provider == "local":
            with suppress(EmbeddingError):
                await asyncio.to_thread(searcher.embed_query, "warm up")
        yield
        engine.dispose()

    app = FastAPI(
        title="embedding_pipeline search",
        description="Semantic, full-text and hybrid search over messages, topics and atoms.",
        version="1",
        lifespan=lifespan,
    )
    app.include_router(build_router(searcher, engine, database_url=settings.effective_database_url))
    return app
