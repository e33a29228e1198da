"""The HNSW index of an embedding column: its name and definition, the quick build inside
`ensure_schema`, the concurrent build and drop a run uses around a bulk load, the memory
a build needs, and the build (bulk-load) lock that keeps two builders apart."""

from __future__ import annotations

import zlib

import psycopg
from psycopg import sql

from embedding_pipeline.lib.store.catalog import (
    ensure_index,
    index_state,
    vector_column_dimension,
    vector_column_type,
)
from embedding_pipeline.lib.store.domain import (
    HnswSettings,
    TableSpec,
)


def hnsw_index_name(spec: TableSpec) -> str:
    return f"{spec.table}_{spec.embedding_column}_hnsw_idx"


def bulk_load_lock_key(spec: TableSpec) -> int:
    """Advisory lock key a run holds (session-wide) while it loads `spec`'s column without
    its HNSW index; index creation elsewhere waits for that run to build it."""
    return zlib.crc32(f"bulk-load:{spec.table}.{spec.embedding_column}".encode()) & 0x7FFFFFFF


def cosine_opclass(vector_type: str) -> str:
    """The HNSW operator class that serves `ORDER BY embedding <=> q` on a column of the
    type: `vector_cosine_ops` or `halfvec_cosine_ops`."""
    return f"{vector_type}_cosine_ops"


def hnsw_index_definition(
    spec: TableSpec, hnsw: HnswSettings, vector_type: str = "vector"
) -> sql.Composed:
    return sql.SQL("USING hnsw ({} {}) WITH (m = {}, ef_construction = {})").format(
        sql.Identifier(spec.embedding_column),
        sql.SQL(cosine_opclass(vector_type)),
        sql.Literal(hnsw.m),
        sql.Literal(hnsw.ef_construction),
    )


def ensure_hnsw_index(conn: psycopg.Connection, spec: TableSpec, hnsw: HnswSettings) -> bool:
    """Create the cosine HNSW index on the embedding column if missing; True if created.

    Runs inside the caller's transaction, so it only builds what is quick to build: an
    index over fewer than `hnsw.bulk_load_min_rows` vectors (always the case for a new
    column). A larger column without its index (a bulk load that was killed) is left to
    the next embedding run, which builds it concurrently without blocking writers
    (`engine.index_lifecycle.build_index`). Does nothing while another session bulk-loads
    the column.
    """
    state = index_state(conn, hnsw_index_name(spec))
    if state == "valid":
        return False
    locked = conn.execute(
        "SELECT pg_try_advisory_xact_lock_shared(%s)", (bulk_load_lock_key(spec),)
    ).fetchone()
    if not (locked and locked[0]):
        return False
    vectors = conn.execute(
        sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} WHERE {} IS NOT NULL LIMIT %s) v").format(
            sql.Identifier(spec.table), sql.Identifier(spec.embedding_column)
        ),
        (hnsw.bulk_load_min_rows,),
    ).fetchone()
    if vectors and vectors[0] >= hnsw.bulk_load_min_rows:
        return False
    if state == "invalid":
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(hnsw_index_name(spec))))
    definition = hnsw_index_definition(spec, hnsw, _column_kind(conn, spec))
    return ensure_index(conn, spec.table, hnsw_index_name(spec), definition)


def _column_kind(conn: psycopg.Connection, spec: TableSpec) -> str:
    """The embedding column's storage type, which its index's operator class follows."""
    found = vector_column_type(conn, spec)
    return found[0] if found else "vector"


def hnsw_build_memory_mb(rows: int, dimension: int, hnsw: HnswSettings) -> int:
    """`maintenance_work_mem` (MB) for an HNSW build over `rows` vectors: the graph's size
    (the vector, its neighbour lists on every layer, pgvector's element overhead; about
    2.3 kB a row at 384 dimensions and m = 16, as pgvector's "no longer fits" notice
    confirms), a quarter more for slack, capped by `hnsw.build_memory_mb`."""
    per_row = 4 * dimension + 40 * hnsw.m + 200
    needed = int(rows * per_row * 1.25 / 2**20) + 16
    return max(64, min(needed, hnsw.build_memory_mb))


def _build_session(conn: psycopg.Connection, spec: TableSpec, hnsw: HnswSettings) -> None:
    """Size this session's `maintenance_work_mem` to the graph about to be built (never
    below the server's setting) and set the parallel workers when configured."""
    row = conn.execute(
        sql.SQL("SELECT count({}) FROM {}").format(
            sql.Identifier(spec.embedding_column), sql.Identifier(spec.table)
        )
    ).fetchone()
    rows = int(row[0]) if row else 0
    memory = hnsw_build_memory_mb(rows, vector_column_dimension(conn, spec) or 0, hnsw)
    current = conn.execute(
        "SELECT setting::bigint * 1024 / 1048576 FROM pg_settings "
        "WHERE name = 'maintenance_work_mem'"
    ).fetchone()
    if current is None or memory > int(current[0]):
        conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (f"{memory}MB",))
    if hnsw.build_workers is not None:
        conn.execute(
            "SELECT set_config('max_parallel_maintenance_workers', %s, false)",
            (str(hnsw.build_workers),),
        )


def build_hnsw_index_concurrently(
    conn: psycopg.Connection, spec: TableSpec, hnsw: HnswSettings, name: str | None = None
) -> bool:
    """CREATE INDEX CONCURRENTLY (writers are not blocked), with the memory the graph needs
    and the server's parallel maintenance workers; `conn` must be in autocommit mode. An
    invalid leftover of an earlier attempt is dropped first. True if built."""
    name = name or hnsw_index_name(spec)
    state = index_state(conn, name)
    if state == "valid":
        return False
    if state == "invalid":
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))
    _build_session(conn, spec, hnsw)
    try:
        conn.execute(
            sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} {}").format(
                sql.Identifier(name),
                sql.Identifier(spec.table),
                hnsw_index_definition(spec, hnsw, _column_kind(conn, spec)),
            )
        )
    finally:
        if not (conn.closed or conn.broken):
            conn.execute("RESET maintenance_work_mem")
            conn.execute("RESET max_parallel_maintenance_workers")
    return True


def drop_hnsw_index_concurrently(conn: psycopg.Connection, spec: TableSpec) -> bool:
    """Drop the HNSW index without blocking readers or writers (`conn` in autocommit)."""
    if index_state(conn, hnsw_index_name(spec)) is None:
        return False
    conn.execute(
        sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            sql.Identifier(hnsw_index_name(spec))
        )
    )
    return True
