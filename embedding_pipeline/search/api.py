"""The search API the application imports: typed queries over messages, topics and atoms.

Built on SQLAlchemy 2 Core and `pgvector.sqlalchemy`, so it runs on the application's own
`Connection` or `Session`, and (the `*_async` variants) on an `AsyncConnection` or
`AsyncSession`. Each call runs in a savepoint of the caller's transaction, or in a short
transaction of its own when none is open, and rolls it back at the end: the
`SET LOCAL`-style settings it makes (`hnsw.ef_search`, `hnsw.iterative_scan`,
`hnsw.max_scan_tuples`) never outlive the call, and nothing is written.

    searcher = Searcher(load_settings())
    with engine.connect() as conn:
        hits = searcher.search(conn, "why did the deploy fail?", table="messages", k=5,
                               filters={"since": "2025-10-01"}, mode="hybrid")

The module-level functions (`search`, `similar`, `atoms_for_message`,
`messages_for_topic` and their `*_async` twins) are the same methods of a searcher built
once from the environment (`default_searcher`).

Modes: `vector` (cosine distance through the HNSW index; score = cosine similarity),
`text` (PostgreSQL full text on the generated `search_tsv` column; any of the query's
words, ranked by `ts_rank`), `hybrid` (reciprocal rank fusion of both rankings; score
= sum of 1 / (rrf_k + rank)).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cache, update_wrapper
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import sqlalchemy as sa

from embedding_pipeline.lib.embedders import Embedder, build_embedder
from embedding_pipeline.lib.embedders.ratelimit import RateLimits
from embedding_pipeline.lib.embedders.retry import RetryPolicy
from embedding_pipeline.search.errors import InvalidQuery, ModelMismatch, NotFound
from embedding_pipeline.search.execution import (
    Explain,
    Steps,
    SyncConnection,
    explain_plan,
    run_steps,
)
from embedding_pipeline.search.execution import engine_for as engine_for  # re-exported
from embedding_pipeline.search.filters import (
    Filters,
    check_applicable,
    filter_params,
    filter_shape,
    parse_filters,
)
from embedding_pipeline.search.inputs import text_problem
from embedding_pipeline.search.query_vectors import QueryVectors, QueryVectorStats
from embedding_pipeline.search.statements import Statements
from embedding_pipeline.search.tables import FIELD_COLUMNS, SearchTables
from embedding_pipeline.search.types import (
    MAX_LIMIT,
    Hit,
    SearchQuery,
    check_id,
    check_limit,
    check_mode,
    check_table,
    check_topic,
)
from embedding_pipeline.settings import Settings, load_settings, openai_api_key

#: How long a query's embedding may retry transient provider failures (a person waits).
QUERY_RETRY_SECONDS = 2.0
#: How long a column found to hold the configured model's vectors is trusted before the
#: next query is embedded without checking it first. The search statement's transaction
#: checks it again anyway: a model switch within this time costs one query embedding,
#: never an answer from two models' vectors.
MODEL_CHECK_SECONDS = 5.0

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

R = TypeVar("R")
P = ParamSpec("P")


#: Which rank a single-ranking mode's position is.
_OWN_RANK: dict[str, str | None] = {"vector": "vector_rank", "text": "text_rank", "hybrid": None}


class Searcher:
    """Search over the configured tables with the configured model. Thread-safe; build one
    per process. `embedder` defaults to the one `settings` describe (built on first use)."""

    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.tables = SearchTables.from_specs(settings.tables)
        self.sql = Statements(self.tables, settings)
        self._embedder = embedder
        self._queries: QueryVectors | None = None
        self._matched: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def embedder(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                e = self.settings.embedder
                self._embedder = build_embedder(
                    e.provider,
                    model=e.model,
                    dimensions=e.dimensions,
                    openai_api_key=openai_api_key(),
                    openai_base_url=e.openai_base_url,
                    ollama_host=e.ollama_host,
                    ollama_max_input_tokens=e.ollama_max_input_tokens,
                    timeout=e.timeout_seconds,
                    # someone is waiting for the answer: a short retry, then a clear 503
                    retry=RetryPolicy(
                        deadline_seconds=min(QUERY_RETRY_SECONDS, e.retry_deadline_seconds),
                        base_seconds=0.1,
                    ),
                    rate_limits=RateLimits(
                        requests_per_minute=e.requests_per_minute,
                        tokens_per_minute=e.tokens_per_minute,
                    ),
                    query_prefix=e.query_prefix,
                    document_prefix=e.document_prefix,
                )
            return self._embedder

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def queries(self) -> QueryVectors:
        """The query vectors: a cache of recent ones and a bounded pool of workers that
        embed the others (`EP_API_QUERY_CACHE_SIZE`, `EP_API_EMBED_WORKERS`)."""
        embedder = self.embedder
        with self._lock:
            if self._queries is None:
                api = self.settings.api
                self._queries = QueryVectors(
                    functools.partial(embedder.embed, query=True),
                    embedder.model_id,
                    workers=api.embed_workers or embedder.default_concurrency,
                    cache_size=api.query_cache_size,
                    max_batch=min(32, embedder.max_batch_size),
                )
            return self._queries

    def embed_query(self, text: str) -> np.ndarray:
        """The query's vector from the configured model, cut to its input limit as runs
        cut rows (`EmbeddingError` on failure); recent queries come from a cache."""
        return self.queries.get(text)

    def query_vector_stats(self) -> tuple[QueryVectorStats, int]:
        """What the query vectors did so far (nothing before the first query), and how
        many are cached."""
        with self._lock:
            queries = self._queries
        return queries.snapshot() if queries is not None else (QueryVectorStats(), 0)

    def close(self) -> None:
        """Stop the query embedding workers (a later query starts them again)."""
        with self._lock:
            queries, self._queries = self._queries, None
        if queries is not None:
            queries.close()

    # -- public queries (sync) -------------------------------------------------------------

    def search(
        self,
        conn: SyncConnection,
        query: str,
        *,
        table: str = "messages",
        k: int = 10,
        filters: Filters | Mapping[str, Any] | None = None,
        mode: str = "vector",
        vector: np.ndarray | Sequence[float] | None = None,
    ) -> list[Hit]:
        """The `k` best rows of `table` for `query`. `vector`, when given, is used instead
        of embedding `query` (it must come from the configured model). The column's model
        is checked before the query is embedded, so a refusal costs no provider call.
        Raises `InvalidQuery`, `ModelMismatch`, `EmbeddingError` or SQLAlchemy's
        `DBAPIError`."""
        request = self.prepare(query, table=table, k=k, filters=filters, mode=mode)
        if request.needs_vector and vector is None:
            if not self.model_matched_recently(request.key):
                self.check_model(conn, request.key)
            vector = self.embed_query(request.text)
        return self.run(conn, request, vector)

    def prepare(
        self,
        query: str,
        *,
        table: str = "messages",
        k: int = 10,
        filters: Filters | Mapping[str, Any] | None = None,
        mode: str = "vector",
    ) -> SearchQuery:
        """The request checked (`InvalidQuery` naming the field), nothing run: the query
        must be text PostgreSQL can store of at most `EP_API_MAX_QUERY_CHARS` characters,
        the filters must apply to the table."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidQuery("query", "must not be empty")
        limit = self.settings.api.max_query_chars
        if len(query) > limit:
            raise InvalidQuery(
                "query", f"must be at most {limit} characters long, got {len(query)}"
            )
        problem = text_problem(query)
        if problem:
            raise InvalidQuery("query", problem)
        request = SearchQuery(
            key=check_table(table),
            text=query.strip(),
            k=check_limit(k),
            filters=parse_filters(filters),
            mode=check_mode(mode),
        )
        check_applicable(request.key, request.filters)
        return request

    def model_matched_recently(self, table: str) -> bool:
        """Whether `table`'s column was found to hold the configured model's vectors in
        the last `MODEL_CHECK_SECONDS` (then `check_model` may be skipped)."""
        checked = self._matched.get(table)
        return checked is not None and time.monotonic() - checked < MODEL_CHECK_SECONDS

    def check_model(self, conn: SyncConnection, table: str) -> None:
        """`ModelMismatch` when `table`'s embedding column holds another model's vectors
        than the one queries are embedded with; run before embedding a query."""
        run_steps(conn, self._column_model(check_table(table)))

    def run(
        self,
        conn: SyncConnection,
        request: SearchQuery,
        vector: np.ndarray | Sequence[float] | None,
    ) -> list[Hit]:
        """A prepared search with its query vector (None for text mode)."""
        return run_steps(conn, self._search_steps(request, self._query_vector(request, vector)))

    def explain(
        self, conn: SyncConnection, query: str, *, analyze: bool = False, **options: Any
    ) -> Any:
        """`EXPLAIN (FORMAT JSON)` of the statement `search(conn, query, **options)` would
        run, with the same settings in force (with `analyze`, it runs it too): is the HNSW
        index used, how many rows did the filters remove?"""
        vector = options.pop("vector", None)
        request = self.prepare(query, **options)
        if request.needs_vector and vector is None:
            self.check_model(conn, request.key)
            vector = self.embed_query(request.text)
        query_vector = self._query_vector(request, vector)
        return run_steps(conn, self._explain_steps(request, query_vector, analyze))

    def similar(
        self,
        conn: SyncConnection,
        table: str,
        id: int,
        *,
        k: int = 10,
        filters: Filters | Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        """The `k` rows of `table` nearest to the stored row `id` (itself excluded); no
        query is embedded. Raises `NotFound` when the row is missing or not embedded."""
        key, parsed, row_id = check_table(table), parse_filters(filters), check_id(id)
        return run_steps(conn, self._similar_steps(key, row_id, check_limit(k), parsed))

    def atoms_for_message(self, conn: SyncConnection, message_id: int) -> list[Hit]:
        """The atoms extracted from a message, oldest first."""
        return run_steps(conn, self._atoms_for_message_steps(check_id(message_id, "message_id")))

    def messages_for_topic(
        self,
        conn: SyncConnection,
        topic: int | str,
        *,
        limit: int = MAX_LIMIT,
        filters: Filters | Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        """The messages of a topic, oldest first, at most `limit`. `topic` is an id (an
        int, or a string of digits such as "2") or a key."""
        steps = self._messages_for_topic_steps(
            check_topic(topic), check_limit(limit, "limit"), parse_filters(filters)
        )
        return run_steps(conn, steps)

    # -- public queries (async: the same steps through run_sync) ---------------------------

    async def search_async(
        self,
        conn: AsyncConnection | AsyncSession,
        query: str,
        *,
        table: str = "messages",
        k: int = 10,
        filters: Filters | Mapping[str, Any] | None = None,
        mode: str = "vector",
        vector: np.ndarray | Sequence[float] | None = None,
    ) -> list[Hit]:
        """`search` on an `AsyncConnection` or `AsyncSession`; the query is embedded by the
        query embedding workers while the event loop keeps running."""
        request = self.prepare(query, table=table, k=k, filters=filters, mode=mode)
        if request.needs_vector and vector is None:
            if not self.model_matched_recently(request.key):
                await conn.run_sync(self.check_model, request.key)
            vector = await asyncio.wrap_future(self.queries.submit(request.text))
        return await conn.run_sync(self.run, request, vector)

    async def similar_async(
        self,
        conn: AsyncConnection | AsyncSession,
        table: str,
        id: int,
        *,
        k: int = 10,
        filters: Filters | Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        return await conn.run_sync(self.similar, table, id, k=k, filters=filters)

    async def atoms_for_message_async(
        self, conn: AsyncConnection | AsyncSession, message_id: int
    ) -> list[Hit]:
        return await conn.run_sync(self.atoms_for_message, message_id)

    async def messages_for_topic_async(
        self,
        conn: AsyncConnection | AsyncSession,
        topic: int | str,
        *,
        limit: int = MAX_LIMIT,
        filters: Filters | Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        return await conn.run_sync(self.messages_for_topic, topic, limit=limit, filters=filters)

    # -- request checking ------------------------------------------------------------------

    def _query_vector(
        self, request: SearchQuery, vector: np.ndarray | Sequence[float] | None
    ) -> np.ndarray | None:
        if not request.needs_vector:
            return None
        if vector is None:
            return self.embed_query(request.text)
        array = np.asarray(vector, dtype=np.float32)
        if array.shape != (self.embedder.dimension,):
            raise InvalidQuery(
                "vector", f"expected {self.embedder.dimension} numbers, got shape {array.shape}"
            )
        return array

    # -- steps ------------------------------------------------------------------------------

    def _column_model(self, key: str) -> Steps[None]:
        """Sets the index options, then refuses when the column's model (registered by
        `model switch`, else the one stored with its vectors) is not the configured one."""
        rows = yield self.sql.vector_prelude(key), {}
        registered = None
        if rows[0]["has_registry"]:
            found = yield self.sql.registered_model(key), {}
            registered = found[0]["model_id"] if found else None
        column_model = registered or rows[0]["stored"]
        if column_model is None or column_model == self.model_id:
            self._matched[key] = time.monotonic()
        else:
            self._matched.pop(key, None)
            spec = self.settings.tables[key]
            source = "registered by `model switch`" if registered else "stored with its vectors"
            raise ModelMismatch(
                f"{spec.table}.{spec.embedding_column} holds vectors of {column_model} "
                f"({source}) but queries would be embedded with {self.model_id}; searching "
                "would compare two models' vectors. Configure the column's model "
                "(EP_EMBEDDING_PROVIDER / EP_EMBEDDING_MODEL / EP_EMBEDDING_DIMENSIONS; "
                "`embedding-pipeline model status` shows it)"
            )

    def _exact(self, key: str, filters: Filters) -> Steps[bool]:
        """Whether the filters keep so few rows (by the planner's estimate) that scanning
        them exactly beats the HNSW index; never without filters."""
        if not filters.used:
            return False
        statement = self.sql.filtered_rows(key, filter_shape(filters))
        rows = yield Explain(statement, analyze=False), filter_params(filters)
        estimate = float(explain_plan(rows)[0]["Plan"]["Plan Rows"])
        return estimate < self.settings.search.exact_below_rows

    def _search_step(
        self, request: SearchQuery, vector: np.ndarray | None, exact: bool
    ) -> tuple[sa.Select[Any], dict[str, Any]]:
        params: dict[str, Any] = {"k": request.k, **filter_params(request.filters)}
        if request.mode != "text":
            params.update(query_vector=vector, model_id=self.model_id)
        if request.mode != "vector":
            params["query_text"] = request.text
        if request.mode == "hybrid":
            params["candidates"] = max(request.k, self.settings.search.hybrid_candidates)
        shape = filter_shape(request.filters)
        return self.sql.search(request.key, request.mode, shape, exact=exact), params

    def _prepared_search(
        self, request: SearchQuery, vector: np.ndarray | None
    ) -> Steps[tuple[sa.Select[Any], dict[str, Any]]]:
        """The model check and index settings (vector modes), the exact-or-index choice,
        then the search statement and its parameters."""
        exact = False
        if vector is not None:
            yield from self._column_model(request.key)
            exact = yield from self._exact(request.key, request.filters)
        return self._search_step(request, vector, exact)

    def _search_steps(self, request: SearchQuery, vector: np.ndarray | None) -> Steps[list[Hit]]:
        rows = yield (yield from self._prepared_search(request, vector))
        return self._hits(request.key, rows, rank=_OWN_RANK[request.mode])

    def _explain_steps(
        self, request: SearchQuery, vector: np.ndarray | None, analyze: bool
    ) -> Steps[Any]:
        statement, params = yield from self._prepared_search(request, vector)
        rows = yield Explain(statement, analyze=analyze), params
        return explain_plan(rows)

    def _similar_steps(self, key: str, row_id: int, k: int, filters: Filters) -> Steps[list[Hit]]:
        check_applicable(key, filters)
        rows = yield self.sql.similar_prelude(key), {"row_id": row_id}
        if not rows[0]["found"]:
            raise NotFound(f"{key} has no row with id {row_id}")
        if rows[0]["model"] is None:
            raise NotFound(f"{key} row {row_id} has no embedding yet")
        params = {"row_id": row_id, "model_id": rows[0]["model"], "k": k}
        exact = yield from self._exact(key, filters)
        statement = self.sql.similar(key, filter_shape(filters), exact=exact)
        ranked = yield statement, {**params, **filter_params(filters)}
        return self._hits(key, ranked, rank="vector_rank")

    def _atoms_for_message_steps(self, message_id: int) -> Steps[list[Hit]]:
        rows = yield self.sql.atoms_for_message(), {"message_id": message_id}
        if not rows:
            yield from self._require("messages", message_id)
        return self._hits("atoms", rows)

    def _messages_for_topic_steps(
        self, topic: int | str, limit: int, filters: Filters
    ) -> Steps[list[Hit]]:
        check_applicable("messages", filters)
        by_key = isinstance(topic, str)
        statement = self.sql.messages_for_topic(by_key, filter_shape(filters))
        rows = yield statement, {"topic": topic, "k": limit, **filter_params(filters)}
        if not rows:
            yield from self._require("topics", topic)
        return self._hits("messages", rows)

    def _require(self, key: str, row_id: int | str) -> Steps[None]:
        by_key = isinstance(row_id, str)
        rows = yield self.sql.exists(key, by_key=by_key), {"row_id": row_id}
        if not rows[0]["found"]:
            raise NotFound(
                f"{key} has no row with that key" if by_key else f"{key} has no row {row_id}"
            )

    def _hits(
        self, key: str, rows: Sequence[sa.RowMapping], *, rank: str | None = None
    ) -> list[Hit]:
        hits = []
        for position, row in enumerate(rows, start=1):
            fields: dict[str, Any] = {f: row[f] for f in (*FIELD_COLUMNS[key], "topic") if f in row}
            if key == "topics":
                fields.update(topic_id=row["id"], topic=row["key"])
            if rank:
                fields[rank] = position
            fields.update({r: row[r] for r in ("vector_rank", "text_rank") if r in row})
            score = row.get("score")
            hits.append(
                Hit(
                    table=key,
                    id=int(row["id"]),
                    score=None if score is None else float(score),
                    text=row["text"],
                    time=row["time"],
                    **fields,
                )
            )
        return hits


@cache
def default_searcher() -> Searcher:
    """A searcher for the environment's settings (`load_settings`), built once."""
    return Searcher(load_settings())


def _with_default(method: Callable[Concatenate[Searcher, P], R]) -> Callable[P, R]:
    """`method` of the default searcher, as a module-level function."""

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        return method(default_searcher(), *args, **kwargs)

    return update_wrapper(call, method)


search = _with_default(Searcher.search)
similar = _with_default(Searcher.similar)
atoms_for_message = _with_default(Searcher.atoms_for_message)
messages_for_topic = _with_default(Searcher.messages_for_topic)
search_async = _with_default(Searcher.search_async)
similar_async = _with_default(Searcher.similar_async)
atoms_for_message_async = _with_default(Searcher.atoms_for_message_async)
messages_for_topic_async = _with_default(Searcher.messages_for_topic_async)
