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
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from queue import SimpleQueue
from typing import Any, Literal

import numpy as np
import psycopg
from psycopg import sql

from embedding_pipeline.lib.embedders.base import Embedder
from embedding_pipeline.lib.embedders.batching import plan_requests
from embedding_pipeline.lib.embedders.errors import EmbeddingError, InputRejectedError
from embedding_pipeline.lib.engine import row_errors
from embedding_pipeline.lib.engine.row_errors import RowErrorPolicy, RowFailure
from embedding_pipeline.lib.store.catalog import index_state, vector_column_dimension
from embedding_pipeline.lib.store.domain import HnswSettings, TableSpec, Window
from embedding_pipeline.lib.store.expressions import needs_embedding_expr, text_expr
from embedding_pipeline.lib.store.hnsw import (
    build_hnsw_index_concurrently,
    bulk_load_lock_key,
    drop_hnsw_index_concurrently,
    hnsw_index_name,
)
from embedding_pipeline.lib.store.schema import (
    SchemaError,
    registered_model,
    set_state,
    state_age_seconds,
)

#: Connections that write a run's vectors (EP_WRITE_CONNECTIONS). Measured at 1536-d against
#: an instant provider on 2 cores (docs/benchmarks.md).
DEFAULT_WRITE_CONNECTIONS = 2


@dataclass(frozen=True)
class EngineOptions:
    """How a run spreads its work; every figure is a setting (README, Configuration)."""

    #: Rows per provider request, capped by the embedder's own limits.
    batch_size: int = 64
    #: Provider requests in flight at once; None: the embedder's default.
    concurrency: int | None = None
    #: Rows claimed per claim transaction; None: enough for every worker twice over, and
    #: at least the embedder's `default_claim_rows`, so that sorting by length has texts
    #: to group.
    claim_size: int | None = None
    row_errors: RowErrorPolicy = field(default_factory=RowErrorPolicy)
    #: Seconds between progress reports (a report per batch would flood the event log).
    progress_interval_seconds: float = 5.0
    #: A run whose first this-many isolated rows were all refused, with none embedded,
    #: stops: the provider refuses everything (a bad model or option), not these rows.
    refuse_all_after: int = 16
    #: How long a run tries to get its database connection back before it fails.
    reconnect_seconds: float = 60.0
    #: Connections that write vectors. 1: the run's own connection writes between its
    #: claims; more: that many writer threads, each with its own connection (opened with
    #: `reconnect`), write while the run's connection only claims, so PostgreSQL works on
    #: several cores (docs/operations.md, "Concurrency: the claim design").
    write_connections: int = DEFAULT_WRITE_CONNECTIONS
    #: Names the run in its claiming session's `application_name` (e.g. the Dagster run
    #: id), so that checks and operators can tell which run holds a row or builds an index.
    session_label: str = ""

    def workers(self, embedder: Embedder) -> int:
        return max(1, self.concurrency or embedder.default_concurrency)

    def request_rows(self, embedder: Embedder) -> int:
        return max(1, min(self.batch_size, embedder.max_batch_size))

    def claim_rows(self, embedder: Embedder) -> int:
        if self.claim_size:
            return max(1, self.claim_size)
        return max(
            embedder.default_claim_rows, 2 * self.workers(embedder) * self.request_rows(embedder)
        )


@dataclass(frozen=True)
class Progress:
    embedded: int
    failed: int
    pending_at_start: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rows_per_second
        left = max(0, self.pending_at_start - self.embedded - self.failed)
        return left / rate if rate > 0 else None

    def describe(self) -> str:
        eta = self.eta_seconds
        return (
            f"{self.embedded}/{self.pending_at_start} embedded"
            + (f", {self.failed} failed" if self.failed else "")
            + f", {self.rows_per_second:.0f} rows/s, {self.seconds:.0f}s"
            + (f", about {eta:.0f}s left" if eta is not None and self.embedded else "")
        )


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
    failed: int = 0
    failed_samples: list[tuple[int, str]] = field(default_factory=list)
    empty_text_ids: list[int] = field(default_factory=list)
    #: Old vectors set to NULL because their row's current text was given up or is empty.
    withdrawn: int = 0
    #: The database snapshot (`pg_current_snapshot()`) taken before the first claim: the
    #: row versions that existed when the run started (`quality.count_missing`).
    start_snapshot: str = ""
    claims: int = 0
    provider_requests: int = 0
    isolation_requests: int = 0
    estimated_tokens: int = 0
    truncated: int = 0
    retries: int = 0
    retry_seconds: float = 0.0
    rate_limit_seconds: float = 0.0
    reconnects: int = 0
    index_strategy: IndexStrategy = "unchanged"
    index_seconds: float = 0.0
    seconds_without_index: float = 0.0
    seconds: float = 0.0

    @property
    def skipped_up_to_date(self) -> int:
        return self.rows_in_window - self.pending_at_start

    @property
    def rows_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds and self.embedded else 0.0


def lock_namespace(spec: TableSpec) -> int:
    """A per-column number that, shifted left 32 bits plus the row id's low 32 bits, is the
    advisory lock key of a row: exact for ids below 2**32; above, two ids of one column
    that differ by a multiple of 2**32 share a key (a run then skips one, the next run
    embeds it), and never a key of another column. Per column, so that filling a
    model switch's shadow column never contends with the live column's runs."""
    return zlib.crc32(f"{spec.table}.{spec.embedding_column}".encode()) & 0x7FFFFFFF


#: `application_name` of a run's claiming session (followed by the run's label), so that
#: checks can tell the claims of a run at work from any other lock on the same key.
CLAIM_SESSION_NAME = "embedding_pipeline claims"


def claim_session_name(label: str) -> str:
    """The `application_name` of a run's claiming session (PostgreSQL keeps 63 bytes)."""
    return f"{CLAIM_SESSION_NAME} {label}".strip()[:63]


def _claims_elsewhere(spec: TableSpec) -> sql.Composed:
    """The advisory locks on `spec`'s rows held by other runs' claiming sessions."""
    return sql.SQL(
        "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.classid = {ns}::oid AND l.pid <> pg_backend_pid() "
        "AND starts_with(a.application_name, {name})"
    ).format(ns=sql.Literal(lock_namespace(spec)), name=sql.Literal(CLAIM_SESSION_NAME))


def claimed_elsewhere_expr(spec: TableSpec, alias: str) -> sql.Composed:
    """True for a row whose claim another run's claiming session holds: that run is
    embedding it now. One read of `pg_locks` per statement (the sub-select is not
    correlated); ids above 2**32 can share a key, as for the claims themselves."""
    return sql.SQL("({id} & 4294967295) IN (SELECT l.objid::bigint {claims})").format(
        id=sql.Identifier(alias, spec.id_column), claims=_claims_elsewhere(spec)
    )


def claiming_sessions(conn: psycopg.Connection, spec: TableSpec) -> list[str]:
    """Who else holds claims on `spec`'s rows now: each claiming session's name (with its
    run's label) and process id."""
    rows = conn.execute(
        sql.SQL("SELECT DISTINCT a.application_name, l.pid {claims} ORDER BY 1, 2").format(
            claims=_claims_elsewhere(spec)
        )
    ).fetchall()
    return [f"{name} (pid {pid})" for name, pid in rows]


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
            needs=needs_embedding_expr(spec, "t", model_id=model_id),
            table=sql.Identifier(spec.table),
            model=sql.Identifier("t", spec.model_column),
            emb=sql.Identifier("t", spec.embedding_column),
            where=where,
        ),
        {**params, "model_id": model_id},
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def analyze_if_stale(conn: psycopg.Connection, spec: TableSpec) -> bool:
    """ANALYZE the table when a fifth of it (and at least 1,000 rows) changed since its last
    statistics: rows loaded a moment ago (an ingest, a restore) would otherwise be planned
    from an empty table's statistics until autovacuum catches up. True if analyzed."""
    row = conn.execute(
        "SELECT n_mod_since_analyze, n_live_tup FROM pg_stat_user_tables WHERE relid = "
        "to_regclass(%s)",
        (sql.Identifier(spec.table).as_string(),),
    ).fetchone()
    conn.commit()
    if row is None or row[0] < max(1_000, 0.2 * row[1]):
        return False
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(spec.table)))
    conn.commit()
    return True


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
    session = _Session(conn, reconnect, options.reconnect_seconds, result)
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
                bulk = _start_bulk_load(conn, spec, index, result.pending_at_start)
                if bulk:
                    bulk_conn = conn
                    result.index_strategy = "built after load"

            embedder.warm_up()
            pipeline = _Pipeline(session, spec, embedder, window, options, on_progress, result)
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
                        set_state(session.conn, _bulk_failed_key(spec), "failed")
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


class _Session:
    """The run's database connection: replaced when lost (bounded), closed at the end if
    the engine opened it."""

    def __init__(
        self,
        conn: psycopg.Connection,
        reconnect: Callable[[], psycopg.Connection] | None,
        reconnect_seconds: float,
        result: SyncResult,
        *,
        own: bool = False,
    ) -> None:
        self.conn = conn
        self._own = own
        self.reconnect = reconnect
        self._reconnect_seconds = reconnect_seconds
        self._result = result
        self.on_reconnect: Callable[[], None] | None = None

    @property
    def lost(self) -> bool:
        return self.conn.closed or self.conn.broken

    def run(self, op: Callable[[psycopg.Connection], object]) -> object:
        """`op(conn)`; when the connection is lost under it, reconnect and call it again."""
        while True:
            try:
                return op(self.conn)
            except psycopg.OperationalError:
                if not self.lost or self.reconnect is None:
                    raise
                self._replace()

    def _replace(self) -> None:
        assert self.reconnect is not None
        fresh = _connect(self.reconnect, self._reconnect_seconds)
        if self._own:
            self.conn.close()
        self.conn, self._own = fresh, True
        self._result.reconnects += 1
        if self.on_reconnect is not None:
            self.on_reconnect()

    def close(self) -> None:
        if self._own:
            self.conn.close()


def _connect(connect: Callable[[], psycopg.Connection], seconds: float) -> psycopg.Connection:
    """A new connection in place of a lost one, tried with backoff for up to `seconds`;
    then the run fails with a one-line reason."""
    deadline = time.monotonic() + seconds
    delay = 0.5
    while True:
        try:
            return connect()
        except psycopg.OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise psycopg.OperationalError(
                    f"lost the database connection and could not reconnect within "
                    f"{seconds:g}s: {str(exc).splitlines()[0]}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class _Writers:
    """Threads that write finished requests, each on a connection of its own, so that
    PostgreSQL applies several requests at once on several cores while the run's own
    connection keeps claiming. A writer holds no row locks (they are the run session's,
    released by it after the write committed); a lost writer connection is re-opened like
    the run's own (`_Session`), and a write that fails for good fails the run, its rows
    left pending for the next run."""

    def __init__(self, sessions: list[_Session]) -> None:
        self._sessions = sessions
        self._idle: SimpleQueue[_Session] = SimpleQueue()
        for session in sessions:
            self._idle.put(session)
        self._pool = ThreadPoolExecutor(max_workers=len(sessions), thread_name_prefix="write")

    @property
    def count(self) -> int:
        return len(self._sessions)

    @classmethod
    def open(
        cls,
        count: int,
        connect: Callable[[], psycopg.Connection],
        reconnect_seconds: float,
        result: SyncResult,
        prepare: Callable[[psycopg.Connection], None],
    ) -> _Writers | None:
        """Up to `count` writers; fewer when the server refuses more connections (its
        `max_connections`), None when it refuses the first: the run then writes on its
        own connection rather than fail for want of a faster way."""
        sessions: list[_Session] = []
        for _ in range(count):
            try:
                conn = connect()
            except psycopg.OperationalError:
                break
            session = _Session(conn, connect, reconnect_seconds, result, own=True)
            session.on_reconnect = lambda s=session: prepare(s.conn)
            sessions.append(session)
            try:
                prepare(conn)
            except BaseException:
                for opened in sessions:
                    opened.close()
                raise
        return cls(sessions) if sessions else None

    def submit(self, op: Callable[[psycopg.Connection], int]) -> Future[int]:
        """Run `op(conn)` on an idle writer connection (reconnecting under it if lost)."""
        return self._pool.submit(self._run, op)

    def _run(self, op: Callable[[psycopg.Connection], int]) -> int:
        session = self._idle.get()
        try:
            written = session.run(op)
        finally:
            self._idle.put(session)
        assert isinstance(written, int)
        return written

    def close(self) -> None:
        """Wait for the writes in flight, then close the connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for session in self._sessions:
            session.close()


@dataclass
class _Row:
    id: int
    text: str
    source_hash: str
    failed_before: bool


@dataclass
class _Request:
    rows: list[_Row]

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]


class _Pipeline:
    """One run's claim → embed → write loop (see the module docstring)."""

    def __init__(
        self,
        session: _Session,
        spec: TableSpec,
        embedder: Embedder,
        window: Window,
        options: EngineOptions,
        on_progress: Callable[[Progress], None] | None,
        result: SyncResult,
    ) -> None:
        self.session = session
        self.spec = spec
        self.embedder = embedder
        self.options = options
        self.on_progress = on_progress
        self.result = result
        self.started = time.monotonic()
        self.last_report = self.started
        self.workers = options.workers(embedder)
        self.request_rows = options.request_rows(embedder)
        self.claim_rows = options.claim_rows(embedder)
        self.queue: deque[_Request] = deque()
        self.held: set[int] = set()
        self.to_release: list[int] = []
        self.after = -(2**63)
        self.exhausted = False
        self.swept_again = False
        self.fatal: BaseException | None = None
        self.writers: _Writers | None = None
        #: Writes handed to the writers and not yet accounted.
        self.writing: dict[Future[int], _Request] = {}
        #: Most requests sent and not yet written (in flight at the provider, or finished
        #: and waiting for or in a writer): what a crash can make the next run send again.
        #: New requests wait while writers lag behind, so finished vectors never pile up.
        self.unwritten_bound = self.workers
        #: Called once, on the session's connection, before the first vectors are written.
        self.before_first_write: Callable[[psycopg.Connection], None] | None = None
        self.namespace = lock_namespace(spec)
        self._statements(window)
        self.session_name = claim_session_name(options.session_label)
        session.on_reconnect = self._after_reconnect
        self._prepare(session.conn, claim_session=self.session_name)

    def _statements(self, window: Window) -> None:
        spec, model_id = self.spec, self.embedder.model_id
        where, self.window_params = window.clause(spec)
        table = sql.Identifier(spec.table)
        id_col = sql.Identifier("t", spec.id_column)
        needs = needs_embedding_expr(spec, "t", model_id=model_id)
        self.claim_sql = sql.SQL("""
            WITH candidates AS MATERIALIZED (
                SELECT {id} AS id FROM {table} t
                WHERE {needs} AND {where} AND {id} > %(after)s AND NOT {blocked}
                ORDER BY {id}
                LIMIT %(limit)s
            )
            SELECT id, pg_try_advisory_lock((%(namespace)s::bigint << 32) + (id & 4294967295))
            FROM candidates ORDER BY id
        """).format(
            id=id_col,
            table=table,
            needs=needs,
            where=where,
            blocked=row_errors.blocked_expr(spec, model_id),
        )
        self.reread_sql = sql.SQL("""
            SELECT {id}, {text}, t.{source}, {failed_before} FROM {table} t
            WHERE {id} = ANY(%(ids)s) AND {needs} AND NOT {blocked}
        """).format(
            id=id_col,
            text=text_expr(spec, "t"),
            source=sql.Identifier(spec.source_hash_column),
            failed_before=row_errors.failed_before_expr(spec),
            table=table,
            needs=needs,
            blocked=row_errors.blocked_expr(spec, model_id),
        )
        self.write_sql = sql.SQL("""
            UPDATE {table} t
            SET {emb} = s.embedding, {model} = %(model_id)s, {hash_col} = s.hash,
                {at} = clock_timestamp()
            FROM ep_staging s
            WHERE {id} = s.id AND t.{source} = s.hash
            RETURNING {id}
        """).format(
            table=table,
            emb=sql.Identifier(spec.embedding_column),
            model=sql.Identifier(spec.model_column),
            hash_col=sql.Identifier(spec.hash_column),
            at=sql.Identifier(spec.embedded_at_column),
            id=id_col,
            source=sql.Identifier(spec.source_hash_column),
        )
        self.release_sql = sql.SQL(
            "SELECT count(pg_advisory_unlock((%(namespace)s::bigint << 32) + (id & 4294967295)))"
            " FROM unnest(%(ids)s::bigint[]) AS id"
        )
        self.relock_sql = sql.SQL(
            "SELECT id FROM unnest(%(ids)s::bigint[]) AS id "
            "WHERE pg_try_advisory_lock((%(namespace)s::bigint << 32) + (id & 4294967295))"
        )

    @staticmethod
    def _prepare(conn: psycopg.Connection, *, claim_session: str | None = None) -> None:
        """A session ready to write (its staging table); with `claim_session`, the run's
        claiming session, named so that checks can tell its locks from any other
        (`claimed_elsewhere_expr`) and name the run."""
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ep_staging "
            "(id bigint, hash text, embedding vector) ON COMMIT DELETE ROWS"
        )
        if claim_session is not None:
            conn.execute(
                "SELECT set_config('application_name', %(name)s, false)",
                {"name": claim_session},
            )
        conn.commit()

    def _after_reconnect(self) -> None:
        """A new session holds none of the old one's locks: take back those still free
        (compare-and-set keeps any row another run took meanwhile correct)."""
        conn = self.session.conn
        self._prepare(conn, claim_session=self.session_name)
        self.to_release.clear()
        if self.held:
            kept = conn.execute(
                self.relock_sql, {"ids": sorted(self.held), "namespace": self.namespace}
            ).fetchall()
            conn.commit()
            self.held = {int(r[0]) for r in kept}

    @contextmanager
    def _transaction(self, conn: psycopg.Connection) -> Iterator[None]:
        """One short transaction that first releases the locks of rows committed before."""
        with conn.transaction():
            if self.to_release:
                conn.execute(
                    self.release_sql, {"ids": self.to_release, "namespace": self.namespace}
                )
                self.to_release = []
            yield

    # --- claim ------------------------------------------------------------------------

    def _claim(self) -> list[_Row]:
        def op(conn: psycopg.Connection) -> list[_Row]:
            with self._transaction(conn):
                candidates = conn.execute(
                    self.claim_sql,
                    {
                        **self.window_params,
                        "after": self.after,
                        "limit": self.claim_rows,
                        "namespace": self.namespace,
                    },
                ).fetchall()
                if not candidates:
                    self.exhausted = True
                    return []
                self.after = candidates[-1][0]
                # a model switch may have swapped the column since the run started
                check_model(conn, self.spec, self.embedder)
                locked = [rid for rid, ok in candidates if ok]
                self.result.skipped_locked += len(candidates) - len(locked)
                self.held.update(locked)
                rows = [
                    _Row(int(rid), text, digest, bool(failed))
                    for rid, text, digest, failed in conn.execute(
                        self.reread_sql, {"ids": locked}
                    ).fetchall()
                ]
            self.result.claims += 1
            done_elsewhere = set(locked) - {r.id for r in rows}
            self._release(done_elsewhere)
            return rows

        rows = self.session.run(op)
        assert isinstance(rows, list)
        return rows

    def _plan(self, rows: list[_Row]) -> None:
        """Requests for a claim: rows that failed before go alone (one bad row must not
        take others down twice), empty texts are recorded at once, the rest sorted by
        length so each request carries texts of similar size."""
        empty = [r for r in rows if not r.text.strip()]
        if empty:
            self.result.empty_text_ids.extend(r.id for r in empty)
            self._record_failures(
                [
                    RowFailure(r.id, r.source_hash, row_errors.EMPTY_TEXT, "nothing to embed")
                    for r in empty
                ],
                empty=True,
            )
        rest = sorted((r for r in rows if r.text.strip()), key=lambda r: len(r.text))
        self.queue.extend(_Request([r]) for r in rest if r.failed_before)
        fresh = [r for r in rest if not r.failed_before]
        budgets = [self.embedder.request_tokens(r.text) for r in fresh]
        for start, end in plan_requests(budgets, self.request_rows, self.embedder.max_batch_tokens):
            self.queue.append(_Request(fresh[start:end]))

    # --- write ------------------------------------------------------------------------

    def _write(self, request: _Request, vectors: np.ndarray) -> None:
        """Write a finished request: on a writer connection when there are writers (the
        rows are accounted and released when it committed, `_written`), else here."""
        if self.before_first_write is not None:
            # on the run's connection, before any write is even handed to a writer
            first, self.before_first_write = self.before_first_write, None
            self.session.run(first)
        if self.writers is not None:

            def apart(conn: psycopg.Connection) -> int:
                with conn.transaction():
                    return self._apply(conn, request, vectors)

            self.writing[self.writers.submit(apart)] = request
            return

        def op(conn: psycopg.Connection) -> int:
            with self._transaction(conn):
                return self._apply(conn, request, vectors)

        written = self.session.run(op)
        assert isinstance(written, int)
        self._wrote(request, written)

    def _apply(self, conn: psycopg.Connection, request: _Request, vectors: np.ndarray) -> int:
        """Stage the vectors and store those whose row still has the embedded text, inside
        the caller's transaction; the number stored. Touches no state of the run: a
        writer thread calls it."""
        with conn.cursor().copy(
            "COPY ep_staging (id, hash, embedding) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "text", "vector"])
            for row, vector in zip(request.rows, vectors, strict=True):
                copy.write_row((row.id, row.source_hash, vector))
        # one primary-key probe per staged row at every table size: the staging table has
        # no statistics, and a hash join would scan the whole table
        conn.execute(
            "SELECT set_config('enable_hashjoin', 'off', true), "
            "set_config('enable_mergejoin', 'off', true)"
        )
        written = {
            int(r[0])
            for r in conn.execute(self.write_sql, {"model_id": self.embedder.model_id}).fetchall()
        }
        retried = [r.id for r in request.rows if r.failed_before and r.id in written]
        row_errors.clear_rows(conn, self.spec, retried)
        return len(written)

    def _written(self, request: _Request, future: Future[int]) -> None:
        """A writer finished: account its rows, or fail the run when it could not write
        (its rows were not written and stay pending; the run's counts exclude them)."""
        try:
            written = future.result()
        except Exception as exc:
            self.fatal = self.fatal or exc
            self._release(r.id for r in request.rows)
            return
        self._wrote(request, written)

    def _wrote(self, request: _Request, written: int) -> None:
        self.result.embedded += written
        self.result.changed_during_run += len(request.rows) - written
        self._release(r.id for r in request.rows)

    def _record_failures(self, failures: list[RowFailure], *, empty: bool = False) -> None:
        """Record rows that cannot be embedded (refused by the provider, or `empty` text:
        nothing to embed, counted apart); those given up lose their old vector."""

        def op(conn: psycopg.Connection) -> int:
            with self._transaction(conn):
                return row_errors.record_failures(
                    conn, self.spec, self.embedder.model_id, failures, self.options.row_errors
                )

        withdrawn = self.session.run(op)
        assert isinstance(withdrawn, int)
        self.result.withdrawn += withdrawn
        if not empty:
            self.result.failed += len(failures)
            for f in failures:
                if len(self.result.failed_samples) < 20:
                    self.result.failed_samples.append((f.row_id, f.message))
        self._release(f.row_id for f in failures)

    def _release(self, ids: Iterable[int]) -> None:
        for rid in ids:
            if rid in self.held:
                self.held.discard(rid)
                self.to_release.append(rid)

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        inflight: dict[Future[np.ndarray], _Request] = {}
        self.writers = self._open_writers()
        self.unwritten_bound = self.workers + (self.writers.count if self.writers else 0)
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="embed")
        try:
            while True:
                self._top_up()
                while (
                    self.fatal is None
                    and self.queue
                    and len(inflight) < self.workers
                    and len(inflight) + len(self.writing) < self.unwritten_bound
                ):
                    request = self.queue.popleft()
                    inflight[pool.submit(self.embedder.embed, request.texts)] = request
                if not inflight and not self.writing:
                    if self.fatal is None and self.exhausted and not self.queue:
                        if self._sweep_again():
                            continue
                        break
                    if self.fatal is not None:
                        break
                    continue
                pending: list[Future[Any]] = [*inflight, *self.writing]
                wait(
                    pending,
                    timeout=self.options.progress_interval_seconds,
                    return_when=FIRST_COMPLETED,
                )
                for future in [f for f in inflight if f.done()]:
                    self._finish(inflight.pop(future), future)
                for written in [f for f in self.writing if f.done()]:
                    self._written(self.writing.pop(written), written)
                self._report()
        finally:
            for future in inflight:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self._close_writers()
            self._release_all()
        self._report(final=True)
        if self.fatal is not None:
            raise self.fatal

    def _sweep_again(self) -> bool:
        """Once the window is exhausted: if rows were skipped because another run held
        them, walk the window once more. Rows that run released without embedding them
        (it failed, or was killed) are this run's to embed; rows still held are that
        run's."""
        if self.swept_again or not self.result.skipped_locked:
            return False
        self.swept_again = True
        self.after = -(2**63)
        self.exhausted = False
        return True

    def _open_writers(self) -> _Writers | None:
        """Writer connections, when the options ask for more than one writing connection
        and the run can open connections (`reconnect`); else the run's own writes."""
        count = self.options.write_connections
        if count <= 1 or self.session.reconnect is None:
            return None
        connect, seconds = self.session.reconnect, self.options.reconnect_seconds
        return _Writers.open(count, connect, seconds, self.result, self._prepare)

    def _close_writers(self) -> None:
        """Let the writes in flight finish and account them (a failed run's counts include
        what it wrote), then close the writer connections."""
        if self.writers is None:
            return
        self.writers.close()
        for future, request in list(self.writing.items()):
            if not future.cancelled():
                self._written(request, future)
            else:
                self._release(r.id for r in request.rows)
        self.writing.clear()
        self.writers = None

    def _top_up(self) -> None:
        """Claim more rows while the workers could run dry soon."""
        while (
            self.fatal is None
            and not self.exhausted
            and len(self.queue) < 2 * self.workers
            and len(self.held) < 2 * self.claim_rows
        ):
            rows = self._claim()
            if rows:
                self._plan(rows)

    def _finish(self, request: _Request, future: Future[np.ndarray]) -> None:
        try:
            vectors = future.result()
        except InputRejectedError as exc:
            self._refused(request, exc)
            return
        except EmbeddingError as exc:
            ids = [r.id for r in request.rows]
            first, last = min(ids), max(ids)
            self.fatal = self.fatal or EmbeddingError(
                f"{exc} (request of {len(request.rows)} rows, ids {first}..{last}: its rows "
                f"were not written; {self.result.embedded} rows written before stay)"
            )
            self._release(r.id for r in request.rows)
            return
        self.result.provider_requests += 1
        self._write(request, vectors)

    def _refused(self, request: _Request, exc: InputRejectedError) -> None:
        """Split a refused request in halves (ahead of the queue) until the rows the
        provider refuses are alone, then record them."""
        self.result.isolation_requests += 1
        if len(request.rows) > 1:
            middle = len(request.rows) // 2
            self.queue.appendleft(_Request(request.rows[middle:]))
            self.queue.appendleft(_Request(request.rows[:middle]))
            return
        [row] = request.rows
        self._record_failures(
            [RowFailure(row.id, row.source_hash, f"HTTP {exc.status}", _one_line(str(exc)))]
        )
        if self.result.embedded == 0 and self.result.failed >= self.options.refuse_all_after:
            self.fatal = EmbeddingError(
                f"{self.embedder.model_id} refused each of the first {self.result.failed} "
                f"rows tried alone and embedded none; the provider rejects every input, "
                f"not a few rows (last answer: {_one_line(str(exc))})"
            )

    def _release_all(self) -> None:
        """Give back every lock still held (unless the session died, which freed them).
        Always a round trip: while the writers wrote, the run's connection may have been
        lost unnoticed, and the work after the load (the index build) needs it back."""
        self._release(list(self.held))
        if self.session.lost:
            return

        def op(conn: psycopg.Connection) -> None:
            conn.rollback()
            conn.execute(self.release_sql, {"ids": self.to_release, "namespace": self.namespace})
            conn.commit()

        with contextlib.suppress(psycopg.Error):  # the locks end with the session
            self.session.run(op)
        self.to_release = []

    def _report(self, *, final: bool = False) -> None:
        now = time.monotonic()
        if self.on_progress is None:
            return
        if not final and now - self.last_report < self.options.progress_interval_seconds:
            return
        self.last_report = now
        self.on_progress(
            Progress(
                embedded=self.result.embedded,
                failed=self.result.failed,
                pending_at_start=self.result.pending_at_start,
                seconds=now - self.started,
            )
        )


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit] + "…"


#: After a bulk load failed, runs of the next this-many seconds insert into the index.
BULK_LOAD_FAILURE_HOLD_SECONDS = 3600.0


def _bulk_failed_key(spec: TableSpec) -> str:
    return f"bulk_load_failed:{spec.table}.{spec.embedding_column}"


def bulk_load_wanted(pending: int, indexed: int, index: HnswSettings) -> bool:
    """Whether loading `pending` rows is cheaper without the HNSW index (then built once
    at the end) than with it (each row inserted into the graph): enough rows, a large
    enough share of the final index, and an index small enough that searching without it
    for the length of the load stays tolerable (docs/operations.md has the figures)."""
    return (
        pending >= index.bulk_load_min_rows
        and indexed < index.bulk_load_max_indexed_rows
        and pending >= index.rebuild_fraction * (indexed + pending)
    )


def _start_bulk_load(
    conn: psycopg.Connection, spec: TableSpec, index: HnswSettings, pending: int
) -> bool:
    """Decide whether this run loads without the HNSW index (`bulk_load_wanted`, and no
    bulk load of this column failed within the hour); if so, hold the bulk-load lock and
    drop the index. Search falls back to an exact scan meanwhile."""
    if pending < index.bulk_load_min_rows:
        return False
    row = conn.execute(
        sql.SQL("SELECT count({}) FROM {}").format(
            sql.Identifier(spec.embedding_column), sql.Identifier(spec.table)
        )
    ).fetchone()
    failed_ago = state_age_seconds(conn, _bulk_failed_key(spec))
    conn.commit()
    if row is None or not bulk_load_wanted(pending, int(row[0]), index):
        return False
    if failed_ago is not None and failed_ago < BULK_LOAD_FAILURE_HOLD_SECONDS:
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


def build_index(
    session: _Session,
    spec: TableSpec,
    index: HnswSettings,
    *,
    release: psycopg.Connection | None = None,
) -> bool:
    """Build the HNSW index concurrently when it is missing or invalid (whoever left it
    so); True if built. Builders take the column's build lock (`bulk_load_lock_key`,
    exclusive): while another session holds it (a bulk load, another run's build), its
    holder builds and this does nothing, so no build drops an index another one is
    still building. A connection lost during the build (a database restart) is re-opened
    and the build tried again, the invalid leftover dropped first. `release`: the
    connection that took the lock for a bulk load, whose hold ends here."""
    key = bulk_load_lock_key(spec)

    def op(conn: psycopg.Connection) -> bool:
        conn.rollback()
        conn.autocommit = True
        try:
            if index_state(conn, hnsw_index_name(spec)) == "valid":
                return False
            locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if not (locked and locked[0]):
                return False
            try:
                return build_hnsw_index_concurrently(conn, spec, index)
            finally:
                if not session.lost:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        finally:
            if not session.lost:
                conn.autocommit = False

    try:
        if session.lost and session.reconnect is None:
            return False
        built = session.run(op)
        assert isinstance(built, bool)
        return built
    finally:
        if release is not None and release is session.conn and not session.lost:
            release.execute("SELECT pg_advisory_unlock(%s)", (key,))
            release.commit()


__all__ = [
    "EngineOptions",
    "Progress",
    "SyncResult",
    "claiming_sessions",
    "count_window",
    "sync_embeddings",
]
