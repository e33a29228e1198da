"""Bringing the embeddings of one time window of one table up to date.

The unit of work is a batch, one transaction each:

1. claim up to `batch_size` rows that need embedding, in id order after the last batch,
   with a transaction-scoped advisory lock per row (rows another run holds are skipped:
   two runs never embed the same row at once, and the application's own writes are never
   blocked);
2. re-read the claimed rows with a fresh snapshot, dropping any that another run finished
   meanwhile;
3. embed them (split into provider requests by the embedder's limits);
4. COPY the vectors into a temporary table and write them with one UPDATE that only
   touches rows whose text still hashes to what was embedded (compare-and-set);
5. commit. A crash loses at most the batch in flight; the next run does only the rest.

Claims walk the window in id order, `batch_size` candidates at a time, so a batch costs an
index range scan, not a pass over the whole window, and a second run that finds rows
locked moves past them to the next ones.

A run with a large backlog relative to what the HNSW index already holds loads without the
index and builds it at the end (`CREATE INDEX CONCURRENTLY`): inserting into the graph row
by row costs several times more than building it once (docs/operations.md has the figures).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import psycopg
from psycopg import sql

from embedding_pipeline.lib.db import hash_expr, needs_embedding_expr, text_expr
from embedding_pipeline.lib.embedders.base import Embedder, EmbeddingError, estimate_tokens
from embedding_pipeline.lib.schema import (
    SchemaError,
    build_hnsw_index_concurrently,
    bulk_load_lock_key,
    drop_hnsw_index_concurrently,
    hnsw_index_name,
    index_state,
    registered_model,
    vector_column_dimension,
)
from embedding_pipeline.lib.text import plan_requests
from embedding_pipeline.settings import HnswSettings, TableSpec


@dataclass(frozen=True)
class Window:
    """Rows whose partition column lies in [start, end); None leaves that side open.

    An open start also takes rows whose partition column is NULL.
    """

    start: datetime | None = None
    end: datetime | None = None

    def clause(self, spec: TableSpec, alias: str = "t") -> tuple[sql.Composable, dict[str, object]]:
        column = sql.Identifier(alias, spec.partition_column)
        parts: list[sql.Composable] = []
        params: dict[str, object] = {}
        if self.start is not None:
            parts.append(sql.SQL("{} >= %(window_start)s").format(column))
            params["window_start"] = self.start
        if self.end is not None:
            upper = sql.SQL("{} < %(window_end)s").format(column)
            if self.start is None:
                upper = sql.SQL("({} OR {} IS NULL)").format(upper, column)
            parts.append(upper)
            params["window_end"] = self.end
        if not parts:
            return sql.SQL("TRUE"), params
        return sql.SQL(" AND ").join(parts), params


@dataclass
class BatchProgress:
    batch: int
    embedded: int
    pending_at_start: int
    seconds: float


IndexStrategy = Literal["unchanged", "incremental", "built after load"]


@dataclass
class SyncResult:
    table: str
    model_id: str
    dimension: int
    rows_in_window: int = 0
    pending_at_start: int = 0
    stale_model_at_start: int = 0
    embedded: int = 0
    changed_during_run: int = 0
    skipped_locked: int = 0
    empty_text_ids: list[int] = field(default_factory=list)
    batches: int = 0
    provider_requests: int = 0
    estimated_tokens: int = 0
    index_strategy: IndexStrategy = "unchanged"
    index_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def skipped_up_to_date(self) -> int:
        return self.rows_in_window - self.pending_at_start


def lock_namespace(spec: TableSpec) -> int:
    """A per-column number that, shifted left 32 bits plus the row id's low 32 bits, is the
    advisory lock key of a row: exact for ids below 2**32; above, two ids of one column
    that differ by a multiple of 2**32 share a key (a run then skips one, the next run
    embeds it), and never a key of another column. Per column, so that filling a
    model switch's shadow column never contends with the live column's runs."""
    return zlib.crc32(f"{spec.table}.{spec.embedding_column}".encode()) & 0x7FFFFFFF


def count_window(
    conn: psycopg.Connection, spec: TableSpec, window: Window, model_id: str
) -> tuple[int, int, int]:
    """(rows in the window, rows needing embedding, rows embedded by another model)."""
    where, params = window.clause(spec)
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE {needs}), "
            "count(*) FILTER (WHERE {model} IS DISTINCT FROM %(model_id)s "
            "AND {emb} IS NOT NULL) FROM {table} t WHERE {where}"
        ).format(
            needs=needs_embedding_expr(spec, "t"),
            table=sql.Identifier(spec.table),
            model=sql.Identifier("t", spec.model_column),
            emb=sql.Identifier("t", spec.embedding_column),
            where=where,
        ),
        {**params, "model_id": model_id},
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def check_dimension(conn: psycopg.Connection, spec: TableSpec, embedder: Embedder) -> None:
    declared = vector_column_dimension(conn, spec)
    if declared != embedder.dimension:
        raise SchemaError(
            f"{spec.table}.{spec.embedding_column} is vector({declared}) but "
            f"{embedder.model_id} produces {embedder.dimension} dimensions; nothing was written"
        )


def check_model(conn: psycopg.Connection, spec: TableSpec, embedder: Embedder) -> None:
    """Refuse to write when `model switch` gave the column to another model, so a run with
    a stale configuration never mixes a second model's vectors into it."""
    registered = registered_model(conn, spec)
    if registered is not None and registered != embedder.model_id:
        raise SchemaError(
            f"{spec.table}.{spec.embedding_column} was switched to {registered} by "
            f"`embedding-pipeline model switch`, but this run is configured for "
            f"{embedder.model_id}; update EP_EMBEDDING_PROVIDER / EP_EMBEDDING_MODEL / "
            "EP_EMBEDDING_DIMENSIONS (nothing was written)"
        )


def sync_embeddings(
    conn: psycopg.Connection,
    spec: TableSpec,
    embedder: Embedder,
    window: Window,
    *,
    batch_size: int,
    on_batch: Callable[[BatchProgress], None] | None = None,
    index: HnswSettings | None = None,
) -> SyncResult:
    """Embed every row of `window` that needs it; returns what was done.

    `conn` must not be in autocommit mode; each batch is committed on its own. With
    `index`, a large load relative to the rows the HNSW index holds drops the index for
    the load and rebuilds it concurrently at the end (even when the load fails), and a
    missing index (left by a killed bulk load) is built concurrently at the end. Raises
    `EmbeddingError` (the failing batch writes nothing; earlier batches stay) or
    `SchemaError` when the column cannot hold the embedder's vectors.
    """
    started = time.monotonic()
    batch_size = max(1, min(batch_size, embedder.max_batch_size))
    result = SyncResult(table=spec.table, model_id=embedder.model_id, dimension=embedder.dimension)
    check_dimension(conn, spec, embedder)
    check_model(conn, spec, embedder)
    result.rows_in_window, result.pending_at_start, result.stale_model_at_start = count_window(
        conn, spec, window, embedder.model_id
    )
    conn.commit()
    bulk = False
    if result.pending_at_start:
        bulk = index is not None and _start_bulk_load(conn, spec, index, result.pending_at_start)
        if index is not None:
            result.index_strategy = "built after load" if bulk else "incremental"
        try:
            _embed_window(conn, spec, embedder, window, batch_size, on_batch, result, started)
        finally:
            if bulk:
                assert index is not None
                result.index_seconds = _finish_bulk_load(conn, spec, index)
    if index is not None and not bulk:
        built = time.monotonic()
        if _build_missing_index(conn, spec, index):
            result.index_strategy = "built after load"
            result.index_seconds = time.monotonic() - built
    result.seconds = time.monotonic() - started
    return result


def _embed_window(
    conn: psycopg.Connection,
    spec: TableSpec,
    embedder: Embedder,
    window: Window,
    batch_size: int,
    on_batch: Callable[[BatchProgress], None] | None,
    result: SyncResult,
    started: float,
) -> None:
    where, window_params = window.clause(spec)
    table = sql.Identifier(spec.table)
    id_col = sql.Identifier("t", spec.id_column)
    claim = sql.SQL("""
        WITH candidates AS MATERIALIZED (
            SELECT {id} AS id FROM {table} t
            WHERE {where} AND {id} > %(after)s AND {needs}
            ORDER BY {id}
            LIMIT %(limit)s
        )
        SELECT id, pg_try_advisory_xact_lock((%(namespace)s::bigint << 32) + (id & 4294967295))
        FROM candidates ORDER BY id
    """).format(id=id_col, table=table, where=where, needs=needs_embedding_expr(spec, "t"))
    reread = sql.SQL("""
        SELECT {id}, {text}, {hash} FROM {table} t
        WHERE {id} = ANY(%(ids)s) AND {needs}
        ORDER BY {id}
    """).format(
        id=id_col,
        text=text_expr(spec, "t"),
        hash=hash_expr(spec, "t"),
        table=table,
        needs=needs_embedding_expr(spec, "t"),
    )
    write = sql.SQL("""
        UPDATE {table} t
        SET {emb} = s.embedding, {model} = %(model_id)s, {hash_col} = s.hash,
            {at} = clock_timestamp()
        FROM ep_staging s
        WHERE {id} = s.id AND {current_hash} = s.hash
    """).format(
        table=table,
        emb=sql.Identifier(spec.embedding_column),
        model=sql.Identifier(spec.model_column),
        hash_col=sql.Identifier(spec.hash_column),
        at=sql.Identifier(spec.embedded_at_column),
        id=id_col,
        current_hash=hash_expr(spec, "t"),
    )
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS ep_staging "
        "(id bigint, hash text, embedding vector) ON COMMIT DELETE ROWS"
    )
    conn.commit()

    after = -(2**63)
    params = {
        **window_params,
        "model_id": embedder.model_id,
        "namespace": lock_namespace(spec),
        "limit": batch_size,
    }
    while True:
        with conn.transaction():
            candidates = conn.execute(claim, {**params, "after": after}).fetchall()
            if not candidates:
                break
            after = candidates[-1][0]
            # a model switch may have swapped the column since the run started; the claim's
            # table lock keeps it from swapping again before this batch commits
            check_model(conn, spec, embedder)
            claimed = [rid for rid, locked in candidates if locked]
            result.skipped_locked += len(candidates) - len(claimed)
            if not claimed:
                continue
            rows = conn.execute(reread, {"ids": claimed, "model_id": embedder.model_id}).fetchall()
            todo = [(rid, text, digest) for rid, text, digest in rows if text.strip()]
            result.empty_text_ids.extend(rid for rid, text, _ in rows if not text.strip())
            if todo:
                written = _embed_and_write(conn, embedder, todo, write, result)
                result.embedded += written
                result.changed_during_run += len(todo) - written
        result.batches += 1
        if on_batch is not None:
            on_batch(
                BatchProgress(
                    batch=result.batches,
                    embedded=result.embedded,
                    pending_at_start=result.pending_at_start,
                    seconds=time.monotonic() - started,
                )
            )


def _start_bulk_load(
    conn: psycopg.Connection, spec: TableSpec, index: HnswSettings, pending: int
) -> bool:
    """Decide whether this run loads without the HNSW index; if so, hold the bulk-load
    lock and drop the index. The index must hold fewer vectors than the load brings, so
    search loses little while it is gone (it falls back to an exact scan)."""
    if pending < index.bulk_load_min_rows:
        return False
    row = conn.execute(
        sql.SQL("SELECT count({}) FROM {}").format(
            sql.Identifier(spec.embedding_column), sql.Identifier(spec.table)
        )
    ).fetchone()
    conn.commit()
    if row is None or int(row[0]) >= pending:
        return False
    locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (bulk_load_lock_key(spec),)).fetchone()
    conn.commit()
    if not (locked and locked[0]):
        return False
    conn.autocommit = True
    try:
        drop_hnsw_index_concurrently(conn, spec)
    except psycopg.Error:
        conn.execute("SELECT pg_advisory_unlock(%s)", (bulk_load_lock_key(spec),))
        raise
    finally:
        conn.autocommit = False
    return True


def _finish_bulk_load(conn: psycopg.Connection, spec: TableSpec, index: HnswSettings) -> float:
    """Build the index concurrently and release the bulk-load lock; seconds spent."""
    started = time.monotonic()
    if conn.closed or conn.broken:
        return 0.0
    conn.rollback()
    conn.autocommit = True
    try:
        build_hnsw_index_concurrently(conn, spec, index)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (bulk_load_lock_key(spec),))
        conn.autocommit = False
    return time.monotonic() - started


def _build_missing_index(conn: psycopg.Connection, spec: TableSpec, index: HnswSettings) -> bool:
    """Build the HNSW index concurrently if it is missing or invalid and no bulk load owns
    the column; True if built."""
    state = index_state(conn, hnsw_index_name(spec))
    conn.rollback()
    if state == "valid":
        return False
    conn.autocommit = True
    try:
        locked = conn.execute(
            "SELECT pg_try_advisory_lock_shared(%s)", (bulk_load_lock_key(spec),)
        ).fetchone()
        if not (locked and locked[0]):
            return False
        try:
            return build_hnsw_index_concurrently(conn, spec, index)
        finally:
            conn.execute("SELECT pg_advisory_unlock_shared(%s)", (bulk_load_lock_key(spec),))
    finally:
        conn.autocommit = False


def _embed_and_write(
    conn: psycopg.Connection,
    embedder: Embedder,
    todo: list[tuple[int, str, str]],
    write: sql.Composed,
    result: SyncResult,
) -> int:
    texts = [text for _, text, _ in todo]
    tokens = [estimate_tokens(t) for t in texts]
    vectors = []
    for start, end in plan_requests(tokens, embedder.max_batch_size, embedder.max_batch_tokens):
        try:
            vectors.append(embedder.embed(texts[start:end]))
        except EmbeddingError as exc:
            first, last = todo[start][0], todo[end - 1][0]
            raise EmbeddingError(
                f"{exc} (batch of ids {first}..{last}; nothing from this batch was written)"
            ) from None
        result.provider_requests += 1
    result.estimated_tokens += sum(tokens)
    with conn.cursor().copy(
        "COPY ep_staging (id, hash, embedding) FROM STDIN WITH (FORMAT BINARY)"
    ) as copy:
        copy.set_types(["int8", "text", "vector"])
        offset = 0
        for block in vectors:
            for vector in block:
                row_id, _, digest = todo[offset]
                copy.write_row((row_id, digest, vector))
                offset += 1
    cursor = conn.execute(write, {"model_id": embedder.model_id})
    return max(cursor.rowcount, 0)
