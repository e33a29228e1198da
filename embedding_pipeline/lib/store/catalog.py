"""What the database already holds: relations, columns and their vector types, index states;
and creating one index when it is missing. Read by the schema, tracking and HNSW modules."""

from __future__ import annotations

import psycopg
from psycopg import sql

from embedding_pipeline.lib.store.domain import (
    VECTOR_TYPES,
    TableSpec,
)


def relation_exists(conn: psycopg.Connection, name: str) -> bool:
    """Whether a table or index called `name` exists (on the search path)."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (qualified_name(name),)).fetchone()
    return bool(row and row[0])


def qualified_name(table: str) -> str:
    return sql.Identifier(table).as_string()


def table_columns(conn: psycopg.Connection, table: str) -> dict[str, str]:
    rows = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod)
        FROM pg_attribute a
        WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
        """,
        (qualified_name(table),),
    ).fetchall()
    return {name: type_name for name, type_name in rows}


def vector_column_type(conn: psycopg.Connection, spec: TableSpec) -> tuple[str, int] | None:
    """The embedding column's storage type (`vector` or `halfvec`) and declared dimension
    (None: missing, of another type, or undeclared)."""
    type_name = table_columns(conn, spec.table).get(spec.embedding_column)
    if type_name is None:
        return None
    kind, _, rest = type_name.partition("(")
    if kind not in VECTOR_TYPES or not rest.endswith(")") or not rest[:-1].isdigit():
        return None
    return kind, int(rest[:-1])


def vector_column_dimension(conn: psycopg.Connection, spec: TableSpec) -> int | None:
    """The declared dimension of the embedding column (None: missing or undeclared)."""
    found = vector_column_type(conn, spec)
    return found[1] if found else None


def column_type_sql(vector_type: str, dimension: int) -> sql.Composed:
    """`vector(n)` or `halfvec(n)`."""
    return sql.SQL("{}({})").format(sql.SQL(vector_type), sql.Literal(dimension))


def index_state(conn: psycopg.Connection, name: str) -> str | None:
    """'valid', 'invalid' (a failed CREATE INDEX CONCURRENTLY left it behind) or None."""
    row = conn.execute(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
        (qualified_name(name),),
    ).fetchone()
    if row is None:
        return None
    return "valid" if row[0] else "invalid"


def ensure_index(
    conn: psycopg.Connection, table: str, name: str, definition: sql.Composable
) -> bool:
    if relation_exists(conn, name):
        return False
    conn.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} {}").format(
            sql.Identifier(name), sql.Identifier(table), definition
        )
    )
    return True
