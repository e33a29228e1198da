"""How complete and current the embeddings are: counts for the CLI, the demo and checks."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from embedding_pipeline.lib.db import needs_embedding_expr
from embedding_pipeline.settings import TableSpec


@dataclass(frozen=True)
class TableStatus:
    table: str
    rows: int
    missing: int
    stale: int

    @property
    def needs_embedding(self) -> int:
        return self.missing + self.stale


def table_status(conn: psycopg.Connection, spec: TableSpec, model_id: str) -> TableStatus:
    """Rows, rows with a NULL embedding, and rows whose embedding is out of date
    (text changed since, or made by another model)."""
    emb = sql.Identifier(spec.embedding_column)
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE {emb} IS NULL), "
            "count(*) FILTER (WHERE {emb} IS NOT NULL AND {needs}) FROM {table}"
        ).format(
            emb=emb,
            needs=needs_embedding_expr(spec, model_id=model_id),
            table=sql.Identifier(spec.table),
        ),
        {"model_id": model_id},
    ).fetchone()
    assert row is not None
    return TableStatus(table=spec.table, rows=int(row[0]), missing=int(row[1]), stale=int(row[2]))
