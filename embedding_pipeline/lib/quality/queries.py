"""What every measurement shares: its own transaction (so a `SET LOCAL` never leaks into a
caller's), the nearest-neighbour query, and the expected index settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from embedding_pipeline.lib.store.domain import TableSpec
from embedding_pipeline.lib.store.expressions import text_expr
from embedding_pipeline.lib.store.hnsw import cosine_opclass

#: The operator class that serves `ORDER BY embedding <=> q` (cosine distance) on a
#: `vector` column, the order `nearest_query` and the search API use; an HNSW index of
#: another class cannot serve them (on a `halfvec` column: `halfvec_cosine_ops`).
EXPECTED_OPCLASS = cosine_opclass("vector")


#: pgvector's defaults, in effect when an index was built without WITH (...).
PGVECTOR_HNSW_DEFAULTS = {"m": 16, "ef_construction": 64}


#: Two similarities closer than this are a tie (float4 vectors, float8 arithmetic).
SIMILARITY_TIE = 1e-6


class QualityError(RuntimeError):
    """A measurement could not be taken as asked (e.g. the connection was mid-transaction)."""


@contextmanager
def own_transaction(conn: psycopg.Connection, *, repeatable_read: bool = False) -> Iterator[None]:
    """A real transaction (not a savepoint) whose `SET LOCAL`s end with it."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise QualityError("this measurement needs an idle connection (commit or roll back first)")
    with conn.transaction():
        if repeatable_read:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        yield


def nearest_query(spec: TableSpec) -> sql.Composed:
    """The nearest-neighbour statement the checks measure: `ORDER BY embedding <=> $1
    LIMIT k` (cosine distance), the form the HNSW index serves and the search API's
    vector mode runs (`embedding_pipeline/search/statements.py`). Parameters:
    %(query)s (vector), %(k)s."""
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
    set_local(conn, "hnsw.ef_search", str(int(ef_search)))


def set_local(conn: psycopg.Connection, name: str, value: str) -> None:
    conn.execute("SELECT set_config(%s, %s, true)", (name, value))


def table_identifier(spec: TableSpec) -> sql.Identifier:
    return sql.Identifier(spec.table)


def as_array(value: Any) -> np.ndarray:
    """A stored vector as float32 numpy (pgvector's loader returns `Vector` objects)."""
    to_numpy = getattr(value, "to_numpy", None)
    return np.asarray(to_numpy() if to_numpy else value, dtype=np.float32)
