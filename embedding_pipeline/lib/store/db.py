"""Connections to PostgreSQL with pgvector's types registered, and SQL helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from embedding_pipeline.lib.store.conninfo import redact
from embedding_pipeline.lib.store.conninfo import redact_url as redact_url
from embedding_pipeline.lib.store.domain import TableSpec


def connect(url: str, *, autocommit: bool = False, vector: bool = True) -> psycopg.Connection:
    """Open a connection; with `vector`, pgvector's types are registered (the extension
    must exist: `schema.ensure_schema` creates it). A failure to connect is raised with
    any password in its message replaced (libpq may quote the connection string)."""
    try:
        conn = psycopg.connect(
            url, autocommit=autocommit, connect_timeout=10, application_name="embedding_pipeline"
        )
    except psycopg.Error as exc:
        raise type(exc)(redact(str(exc), url)) from None
    if vector:
        try:
            register_vector(conn)
        except psycopg.ProgrammingError:
            conn.close()
            raise
        if not autocommit:
            conn.commit()
    return conn


@contextmanager
def connection(
    url: str, *, autocommit: bool = False, vector: bool = True
) -> Iterator[psycopg.Connection]:
    conn = connect(url, autocommit=autocommit, vector=vector)
    try:
        yield conn
    finally:
        conn.close()


def database_now(conn: psycopg.Connection) -> datetime:
    """The database's clock (which stamps `embedded_at` and `embedding_pending_since`);
    ends the transaction it opened."""
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    conn.commit()
    assert row is not None
    return row[0]


def text_expr(spec: TableSpec, alias: str | None = None) -> sql.Composable:
    """The text a row is embedded from: its non-NULL text columns joined by newlines."""
    columns = [sql.Identifier(alias, c) if alias else sql.Identifier(c) for c in spec.text_columns]
    return sql.SQL("concat_ws(E'\\n', {})").format(sql.SQL(", ").join(columns))


def hash_expr(spec: TableSpec, alias: str | None = None) -> sql.Composable:
    """SHA-256 (hex) of the row's text, computed in the database (matches `text.content_hash`)."""
    return sql.SQL("encode(sha256(convert_to({}, 'UTF8')), 'hex')").format(text_expr(spec, alias))


def needs_embedding_expr(
    spec: TableSpec, alias: str | None = None, *, model_id: str
) -> sql.Composable:
    """True where the row has no embedding, its text changed since (the stored source hash,
    kept by the tracking trigger, differs from the hash of the embedded text), or another
    model made it.

    Reads stored columns only, so no row's text is hashed. The model id is written as a
    literal, not a parameter: the planner then proves that a query filtering on this
    expression can use the partial "pending" index built on the very same expression
    (`schema.ensure_pending_index`)."""

    def col(name: str) -> sql.Composable:
        return sql.Identifier(alias, name) if alias else sql.Identifier(name)

    return sql.SQL(
        "({emb} IS NULL OR {hash} IS DISTINCT FROM {source} OR {model} IS DISTINCT FROM {m})"
    ).format(
        emb=col(spec.embedding_column),
        hash=col(spec.hash_column),
        source=col(spec.source_hash_column),
        model=col(spec.model_column),
        m=sql.Literal(model_id),
    )
