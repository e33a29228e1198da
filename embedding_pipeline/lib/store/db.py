"""Connections to PostgreSQL with pgvector's types registered."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import psycopg
from pgvector.psycopg import register_vector

from embedding_pipeline.lib.store.conninfo import redact
from embedding_pipeline.lib.store.conninfo import redact_url as redact_url


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
