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
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import sql

from embedding_pipeline.lib.db import hash_expr, needs_embedding_expr, text_expr
from embedding_pipeline.lib.embedders.base import Embedder, EmbeddingError, estimate_tokens
from embedding_pipeline.lib.schema import SchemaError, vector_column_dimension
from embedding_pipeline.lib.text import plan_requests
from embedding_pipeline.settings import TableSpec


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


@dataclass
class SyncResult:
    table: str
    model_id: str
    dimension: int
    rows_in_window: int = 0
    pending_at_start: int = 0
    embedded: int = 0
    changed_during_run: int = 0
    empty_text_ids: list[int] = field(default_factory=list)
    batches: int = 0
    provider_requests: int = 0
    estimated_tokens: int = 0
    seconds: float = 0.0

    @property
    def skipped_up_to_date(self) -> int:
        return self.rows_in_window - self.pending_at_start


def lock_namespace(spec: TableSpec) -> int:
    """A per-table number that, shifted left 32 bits and or-ed with the row id, is the
    advisory lock key of a row (exact for ids below 2**32)."""
    return zlib.crc32(spec.table.encode()) & 0x7FFFFFFF


def count_window(conn: psycopg.Connection, spec: TableSpec, window: Window,
                 model_id: str) -> tuple[int, int]:
    """(rows in the window, rows needing embedding) for one table."""
    where, params = window.clause(spec)
    row = conn.execute(
        sql.SQL("SELECT count(*), count(*) FILTER (WHERE {needs}) FROM {table} t "
                "WHERE {where}").format(
            needs=needs_embedding_expr(spec, "t"), table=sql.Identifier(spec.table),
            where=where),
        {**params, "model_id": model_id},
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def check_dimension(conn: psycopg.Connection, spec: TableSpec, embedder: Embedder) -> None:
    declared = vector_column_dimension(conn, spec)
    if declared != embedder.dimension:
        raise SchemaError(
            f"{spec.table}.{spec.embedding_column} is vector({declared}) but "
            f"{embedder.model_id} produces {embedder.dimension} dimensions; nothing was written"
        )


def sync_embeddings(
    conn: psycopg.Connection,
    spec: TableSpec,
    embedder: Embedder,
    window: Window,
    *,
    batch_size: int,
    on_batch: Callable[[BatchProgress], None] | None = None,
) -> SyncResult:
    """Embed every row of `window` that needs it; returns what was done.

    `conn` must not be in autocommit mode; each batch is committed on its own. Raises
    `EmbeddingError` (the failing batch writes nothing; earlier batches stay) or
    `SchemaError` when the column cannot hold the embedder's vectors.
    """
    started = time.monotonic()
    batch_size = max(1, min(batch_size, embedder.max_batch_size))
    result = SyncResult(table=spec.table, model_id=embedder.model_id,
                        dimension=embedder.dimension)
    check_dimension(conn, spec, embedder)
    result.rows_in_window, result.pending_at_start = count_window(
        conn, spec, window, embedder.model_id)
    conn.commit()
    if result.pending_at_start == 0:
        result.seconds = time.monotonic() - started
        return result

    where, window_params = window.clause(spec)
    table = sql.Identifier(spec.table)
    id_col = sql.Identifier("t", spec.id_column)
    claim = sql.SQL("""
        SELECT c.id FROM (
            SELECT {id} AS id FROM {table} t
            WHERE {where} AND {id} > %(after)s AND {needs}
            ORDER BY {id}
        ) c
        WHERE pg_try_advisory_xact_lock((%(namespace)s::bigint << 32) | c.id)
        LIMIT %(limit)s
    """).format(id=id_col, table=table, where=where, needs=needs_embedding_expr(spec, "t"))
    reread = sql.SQL("""
        SELECT {id}, {text}, {hash} FROM {table} t
        WHERE {id} = ANY(%(ids)s) AND {needs}
        ORDER BY {id}
    """).format(id=id_col, text=text_expr(spec, "t"), hash=hash_expr(spec, "t"), table=table,
                needs=needs_embedding_expr(spec, "t"))
    write = sql.SQL("""
        UPDATE {table} t
        SET {emb} = s.embedding, {model} = %(model_id)s, {hash_col} = s.hash,
            {at} = clock_timestamp()
        FROM ep_staging s
        WHERE {id} = s.id AND {current_hash} = s.hash
    """).format(
        table=table, emb=sql.Identifier(spec.embedding_column),
        model=sql.Identifier(spec.model_column), hash_col=sql.Identifier(spec.hash_column),
        at=sql.Identifier(spec.embedded_at_column), id=id_col,
        current_hash=hash_expr(spec, "t"),
    )
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS ep_staging "
                 "(id bigint, hash text, embedding vector) ON COMMIT DELETE ROWS")
    conn.commit()

    after = -(2**63)
    params = {**window_params, "model_id": embedder.model_id,
              "namespace": lock_namespace(spec), "limit": batch_size}
    while True:
        with conn.transaction():
            claimed = [r[0] for r in conn.execute(claim, {**params, "after": after})]
            if not claimed:
                break
            after = claimed[-1]
            rows = conn.execute(reread, {"ids": claimed, "model_id": embedder.model_id}).fetchall()
            todo = [(rid, text, digest) for rid, text, digest in rows if text.strip()]
            result.empty_text_ids.extend(rid for rid, text, _ in rows if not text.strip())
            if todo:
                written = _embed_and_write(conn, embedder, todo, write, result)
                result.embedded += written
                result.changed_during_run += len(todo) - written
        result.batches += 1
        if on_batch is not None:
            on_batch(BatchProgress(batch=result.batches, embedded=result.embedded,
                                   pending_at_start=result.pending_at_start,
                                   seconds=time.monotonic() - started))
    result.seconds = time.monotonic() - started
    return result


def _embed_and_write(conn: psycopg.Connection, embedder: Embedder,
                     todo: list[tuple[int, str, str]], write: sql.Composed,
                     result: SyncResult) -> int:
    texts = [text for _, text, _ in todo]
    tokens = [estimate_tokens(t) for t in texts]
    vectors = []
    for start, end in plan_requests(tokens, embedder.max_batch_size, embedder.max_batch_tokens):
        try:
            vectors.append(embedder.embed(texts[start:end]))
        except EmbeddingError as exc:
            first, last = todo[start][0], todo[end - 1][0]
            raise EmbeddingError(f"{exc} (batch of ids {first}..{last}; nothing from this "
                                 "batch was written)") from None
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
