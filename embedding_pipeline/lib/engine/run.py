"""Bringing the embeddings of one time window of one table up to date.

The engine keeps several provider requests in flight while the database work (claiming
rows, writing vectors) goes on beside them, and never holds a transaction open while a
provider thinks:

1. **claim** (one short transaction): walk the window's rows that need embedding in id
   order (the partial "pending" index makes this an index range scan), skip rows whose
   current text failed and is not due again (the errors table), take a session-level
   advisory lock per row (rows another run holds are skipped: two runs never embed the
   same row at once, and the application's own writes are never blocked), and re-read
   the locked rows' text and source hash with a fresh snapshot, dropping any another run
   finished meanwhile. Commit; the locks stay with the session.
2. **embed**: the claimed rows, sorted by text length across the whole claim (so each
   request pads little), are split into requests within the embedder's limits and sent
   by up to `concurrency` worker threads. Transient failures are retried inside the
   embedder; a request the provider refuses is split in halves until the rows it refuses
   are alone, and those are recorded in the errors table while the rest are written.
3. **write** (one short transaction per finished request): COPY the vectors into a
   temporary table and apply them with one UPDATE, by primary key, only where the row's
   source hash is still the one that was embedded (compare-and-set: text edited
   meanwhile keeps its new text and stays pending). Commit, then release the rows' locks.
   With `write_connections` above 1, writer threads do this on connections of their own
   while the run's connection keeps claiming; the locks stay the run session's, released
   by it once the writer committed.

A crash loses at most `concurrency + write_connections` requests (those in flight at the
provider and those finished and not yet written: new requests wait while the writers lag
behind); the locks die with the session and the next run does only the rest. A lost
database connection is re-opened (bounded) and the finished vectors in memory are written
on the new one.

A run with a large backlog relative to what the HNSW index already holds loads without the
index and builds it at the end (`CREATE INDEX CONCURRENTLY`): inserting into the graph row
by row costs several times more than building it once (docs/operations.md has the figures).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import replace

import psycopg

from embedding_pipeline.lib.embedders.base import Embedder
from embedding_pipeline.lib.engine import row_errors
from embedding_pipeline.lib.engine.index_lifecycle import (
    begin_bulk_load,
    build_index,
    bulk_failed_key,
)
from embedding_pipeline.lib.engine.options import EngineOptions, Progress, SyncResult
from embedding_pipeline.lib.engine.pipeline import Pipeline
from embedding_pipeline.lib.engine.preflight import (
    analyze_if_stale,
    check_dimension,
    check_model,
    count_window,
)
from embedding_pipeline.lib.engine.sessions import Session
from embedding_pipeline.lib.store.domain import HnswSettings, TableSpec, Window
from embedding_pipeline.lib.store.schema import (
    set_state,
)


def sync_embeddings(
    conn: psycopg.Connection,
    spec: TableSpec,
    embedder: Embedder,
    window: Window,
    *,
    batch_size: int | None = None,
    options: EngineOptions | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    index: HnswSettings | None = None,
    reconnect: Callable[[], psycopg.Connection] | None = None,
) -> SyncResult:
    """Embed every row of `window` that needs it; returns what was done.

    `conn` must not be in autocommit mode; each write is committed on its own. With
    `index`, a large load relative to the rows the HNSW index holds drops the index for
    the load and rebuilds it concurrently at the end (even when the load fails), and a
    missing index (left by a killed bulk load) is built concurrently at the end. With
    `reconnect`, a lost connection is replaced by a new one from it (closed at the end).
    Raises `EmbeddingError` when the provider cannot embed at all (written requests stay)
    or `SchemaError` when the column cannot hold the embedder's vectors.
    """
    options = options or EngineOptions()
    if batch_size is not None:
        options = replace(options, batch_size=batch_size)
    started = time.monotonic()
    result = SyncResult(table=spec.table, model_id=embedder.model_id, dimension=embedder.dimension)
    analyze_if_stale(conn, spec)
    check_dimension(conn, spec, embedder)
    check_model(conn, spec, embedder)
    result.rows_in_window, result.pending_at_start, result.stale_model_at_start = count_window(
        conn, spec, window, embedder.model_id
    )
    snapshot = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
    result.start_snapshot = str(snapshot[0]) if snapshot else ""
    conn.commit()
    retries_before = embedder.retry_stats.retries
    waited_before = embedder.retry_stats.seconds_waited
    limited_before = embedder.stats.rate_limit_seconds
    truncated_before = embedder.stats.truncated
    tokens_before = embedder.stats.estimated_tokens
    bulk = False
    bulk_conn: psycopg.Connection | None = None
    session = Session(conn, reconnect, options.reconnect_seconds, result)
    try:
        if result.pending_at_start:
            dropped_at = 0.0
            if index is not None:
                result.index_strategy = "incremental"

            def start_bulk_load(conn: psycopg.Connection) -> None:
                # only once the provider has answered: a run that cannot embed (provider
                # down) must not drop the index and rebuild it as it fails, run after run
                nonlocal bulk, dropped_at, bulk_conn
                assert index is not None
                dropped_at = time.monotonic()
                bulk = begin_bulk_load(conn, spec, index, result.pending_at_start)
                if bulk:
                    bulk_conn = conn
                    result.index_strategy = "built after load"

            embedder.warm_up()
            pipeline = Pipeline(session, spec, embedder, window, options, on_progress, result)
            if index is not None:
                pipeline.before_first_write = start_bulk_load
            try:
                pipeline.run()
            except Exception:
                if not session.lost and bulk:
                    # the retried run inserts into the rebuilt index instead of dropping it
                    # again: a failure after the provider answered must not cost a rebuild
                    # per attempt
                    with contextlib.suppress(psycopg.Error), session.conn.transaction():
                        set_state(session.conn, bulk_failed_key(spec), "failed")
                if index is not None and not bulk and not session.lost:
                    # a run that cannot embed (provider down) still leaves the column indexed
                    with contextlib.suppress(psycopg.Error):
                        build_index(session, spec, index)
                raise
            finally:
                if bulk:
                    assert index is not None
                    built = time.monotonic()
                    build_index(session, spec, index, release=bulk_conn)
                    result.index_seconds = time.monotonic() - built
                    result.seconds_without_index = time.monotonic() - dropped_at
        if index is not None and not bulk:
            built = time.monotonic()
            if build_index(session, spec, index):
                result.index_strategy = "built after load"
                result.index_seconds = time.monotonic() - built
        row_errors.prune_obsolete(session.conn, spec)
    finally:
        result.retries = embedder.retry_stats.retries - retries_before
        result.retry_seconds = embedder.retry_stats.seconds_waited - waited_before
        result.rate_limit_seconds = embedder.stats.rate_limit_seconds - limited_before
        result.truncated = embedder.stats.truncated - truncated_before
        result.estimated_tokens = embedder.stats.estimated_tokens - tokens_before
        session.close()
    result.seconds = time.monotonic() - started
    return result
