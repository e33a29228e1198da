"""How complete and current the embeddings are: counts for the CLI, the demo and checks."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from embedding_pipeline.lib.engine.row_errors import recorded_expr
from embedding_pipeline.lib.store.domain import TableSpec
from embedding_pipeline.lib.store.expressions import needs_embedding_expr


@dataclass(frozen=True)
class TableStatus:
    """`missing`: no vector, to be embedded; `stale`: a vector of other text or another
    model; `failed`: the provider refused the current text (given up or waiting for
    another try: no vector, or the old one until given up); `empty`: no text to embed."""

    table: str
    rows: int
    missing: int
    stale: int
    failed: int = 0
    empty: int = 0

    @property
    def needs_embedding(self) -> int:
        return self.missing + self.stale


def table_status(conn: psycopg.Connection, spec: TableSpec, model_id: str) -> TableStatus:
    """One pass over the table: rows, and those missing, stale, failed or empty."""
    emb = sql.Identifier(spec.embedding_column)
    needs = needs_embedding_expr(spec, "t", model_id=model_id)
    failed = recorded_expr(spec, model_id, kind="failed")
    empty = recorded_expr(spec, model_id, kind="empty")
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), "
            "count(*) FILTER (WHERE t.{emb} IS NULL AND NOT {failed} AND NOT {empty}), "
            "count(*) FILTER (WHERE t.{emb} IS NOT NULL AND {needs} AND NOT {failed}), "
            "count(*) FILTER (WHERE {needs} AND {failed}), "
            "count(*) FILTER (WHERE {needs} AND {empty}) FROM {table} t"
        ).format(
            emb=emb, needs=needs, failed=failed, empty=empty, table=sql.Identifier(spec.table)
        ),
    ).fetchone()
    assert row is not None
    rows, missing, stale, failed_rows, empty_rows = (int(v) for v in row)
    return TableStatus(spec.table, rows, missing, stale, failed_rows, empty_rows)
