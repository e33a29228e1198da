"""Nearest-neighbour search over one embedded table with the HNSW index."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from embedding_pipeline.lib.db import text_expr
from embedding_pipeline.settings import TableSpec


@dataclass(frozen=True)
class Hit:
    table: str
    id: int
    similarity: float
    text: str


def nearest_query(spec: TableSpec) -> sql.Composed:
    """The statement search runs: `ORDER BY embedding <=> $1 LIMIT k` (cosine distance),
    the form the HNSW index serves. Parameters: %(query)s (vector), %(k)s."""
    emb = sql.Identifier(spec.embedding_column)
    return sql.SQL(
        "SELECT {id}, 1 - ({emb} <=> %(query)s) AS similarity, {text} FROM {table} "
        "ORDER BY {emb} <=> %(query)s LIMIT %(k)s"
    ).format(
        id=sql.Identifier(spec.id_column),
        emb=emb,
        text=text_expr(spec),
        table=sql.Identifier(spec.table),
    )


def set_ef_search(conn: psycopg.Connection, ef_search: int) -> None:
    """`hnsw.ef_search` for the current transaction (candidates kept while searching)."""
    conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(int(ef_search)),))


def search_table(
    conn: psycopg.Connection, spec: TableSpec, query: np.ndarray, *, k: int = 5, ef_search: int = 40
) -> list[Hit]:
    with conn.transaction():
        set_ef_search(conn, ef_search)
        rows = conn.execute(nearest_query(spec), {"query": query, "k": k}).fetchall()
    return [
        Hit(table=spec.table, id=int(r[0]), similarity=float(r[1]), text=str(r[2]))
        for r in rows
        if r[1] is not None
    ]
