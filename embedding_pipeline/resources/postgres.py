"""The PostgreSQL+pgvector database the pipeline reads and writes."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg

from embedding_pipeline.lib.store import db


class PostgresResource(dg.ConfigurableResource):
    """Connections to the application database (pgvector types registered)."""

    database_url: str

    def connect(self) -> psycopg.Connection:
        """A new connection with pgvector's types (the caller closes it)."""
        return db.connect(self.database_url)

    @contextmanager
    def connection(self, *, vector: bool = True) -> Iterator[psycopg.Connection]:
        conn = db.connect(self.database_url, vector=vector)
        try:
            yield conn
        finally:
            conn.close()
