"""Shape: the column's declared type and the stored vectors' dimension match the model."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from embedding_pipeline.lib.quality.queries import own_transaction, table_identifier
from embedding_pipeline.lib.store.catalog import vector_column_dimension
from embedding_pipeline.lib.store.domain import TableSpec


@dataclass(frozen=True)
class DimensionReport:
    """The column's declared type against the model's dimension, and a sample of stored
    vectors (a declared `vector(n)` already makes PostgreSQL reject any other length)."""

    table: str
    column_type: str | None
    declared: int | None
    expected: int
    sampled: int
    dimensions_found: dict[int, int]
    mismatched_ids: list[int]

    @property
    def ok(self) -> bool:
        return self.declared == self.expected and all(
            d == self.expected for d in self.dimensions_found
        )


def check_dimension(
    conn: psycopg.Connection, spec: TableSpec, *, expected: int, sample_size: int, sample_ids: int
) -> DimensionReport:
    with own_transaction(conn):
        row = conn.execute(
            "SELECT format_type(a.atttypid, a.atttypmod), t.typname FROM pg_attribute a "
            "JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped",
            (table_identifier(spec).as_string(conn), spec.embedding_column),
        ).fetchone()
        column_type = str(row[0]) if row else None
        declared = vector_column_dimension(conn, spec) if row else None
        found: dict[int, int] = {}
        mismatched: list[int] = []
        sampled = 0
        if row is not None and row[1] in ("vector", "halfvec"):
            rows = conn.execute(
                sql.SQL(
                    "SELECT {id}, vector_dims({emb}) FROM {table} WHERE {emb} IS NOT NULL "
                    "LIMIT %(n)s"
                ).format(
                    id=sql.Identifier(spec.id_column),
                    emb=sql.Identifier(spec.embedding_column),
                    table=table_identifier(spec),
                ),
                {"n": sample_size},
            ).fetchall()
            sampled = len(rows)
            for row_id, dims in rows:
                found[int(dims)] = found.get(int(dims), 0) + 1
                if int(dims) != expected and len(mismatched) < sample_ids:
                    mismatched.append(int(row_id))
    return DimensionReport(
        table=spec.table,
        column_type=column_type,
        declared=declared,
        expected=expected,
        sampled=sampled,
        dimensions_found=found,
        mismatched_ids=mismatched,
    )
