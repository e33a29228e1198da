"""What a run checks and counts before its first claim: fresh statistics, a column that
holds the embedder's vectors and belongs to its model, and the rows of its window."""

from __future__ import annotations

import psycopg
from psycopg import sql

from embedding_pipeline.lib.embedders.base import Embedder
from embedding_pipeline.lib.store.catalog import vector_column_dimension
from embedding_pipeline.lib.store.domain import TableSpec, Window
from embedding_pipeline.lib.store.expressions import needs_embedding_expr
from embedding_pipeline.lib.store.schema import (
    SchemaError,
    registered_model,
)


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
