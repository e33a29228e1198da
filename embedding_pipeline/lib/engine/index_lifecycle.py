"""The HNSW index around a run: whether a load goes without it (dropped, then built once at
the end), and the concurrent build of a missing or invalid index under the build lock."""

from __future__ import annotations

import psycopg
from psycopg import sql

from embedding_pipeline.lib.engine.sessions import Session
from embedding_pipeline.lib.store.catalog import index_state
from embedding_pipeline.lib.store.domain import HnswSettings, TableSpec
from embedding_pipeline.lib.store.hnsw import (
    build_hnsw_index_concurrently,
    bulk_load_lock_key,
    drop_hnsw_index_concurrently,
    hnsw_index_name,
)
from embedding_pipeline.lib.store.schema import (
    state_age_seconds,
)

#: After a bulk load failed, runs of the next this-many seconds insert into the index.
BULK_LOAD_FAILURE_HOLD_SECONDS = 3600.0


def bulk_failed_key(spec: TableSpec) -> str:
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


def begin_bulk_load(
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
    failed_ago = state_age_seconds(conn, bulk_failed_key(spec))
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
    session: Session,
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
