"""How the search API's queries run: a query as steps (a generator of statements), run
in a rolled-back scope on a sync connection, `EXPLAIN` as a statement, and the engine."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler

from embedding_pipeline.lib.store import db

T = TypeVar("T")
#: A query as a generator: it yields statements with their parameters, receives their
#: rows, and returns its result. The same steps run on a sync connection and, through
#: `run_sync`, on an async one.
Step = tuple[sa.Executable, dict[str, Any]]
Steps = Generator[Step, Sequence[sa.RowMapping], T]
SyncConnection = sa.Connection | Session


@contextmanager
def scope(conn: SyncConnection) -> Iterator[None]:
    """A savepoint inside the caller's transaction, or a transaction of our own; always
    rolled back (search writes nothing), which also ends every transaction-local setting."""
    transaction = conn.begin_nested() if conn.in_transaction() else conn.begin()
    try:
        yield
    finally:
        with suppress(sa.exc.DBAPIError):
            transaction.rollback()


def run_steps(conn: SyncConnection, steps: Steps[T]) -> T:
    with scope(conn):
        statement, params = next(steps)
        while True:
            rows = conn.execute(statement, params).mappings().all()
            try:
                statement, params = steps.send(rows)
            except StopIteration as done:
                return done.value


class Explain(sa.Executable, sa.ClauseElement):
    """`EXPLAIN (FORMAT JSON[, ANALYZE]) <statement>` as an executable construct."""

    inherit_cache = False

    def __init__(self, statement: sa.Select[Any], *, analyze: bool) -> None:
        self.statement = statement
        self.analyze = analyze


def explain_plan(rows: Sequence[sa.RowMapping]) -> Any:
    """The JSON plan an `Explain` answered (its one column, by position: SQLAlchemy names
    result columns after the explained statement's)."""
    return next(iter(rows[0].values()))


@compiles(Explain)
def _compile_explain(element: Explain, compiler: SQLCompiler, **kw: Any) -> str:
    options = "ANALYZE, FORMAT JSON" if element.analyze else "FORMAT JSON"
    return f"EXPLAIN ({options}) {compiler.process(element.statement, **kw)}"


def engine_for(url: str, *, statement_timeout: float | None = None, **options: Any) -> sa.Engine:
    """A pooled SQLAlchemy engine (psycopg 3) on `url` (a URL or a libpq keyword string).
    Connections are opened by `lib.store.db.connect`, so a failure never shows the password;
    `pool_pre_ping` replaces connections a database restart broke; `hide_parameters`
    keeps statement parameters (query text, filter values) out of exception messages;
    `statement_timeout` (seconds) bounds every statement on its connections."""
    options = {"pool_pre_ping": True, "hide_parameters": True, **options}
    engine = sa.create_engine(
        "postgresql+psycopg://", creator=lambda: db.connect(url, vector=False), **options
    )
    if statement_timeout is not None:
        milliseconds = max(1, round(statement_timeout * 1000))

        @sa.event.listens_for(engine, "connect")
        def bound_statements(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(f"SET statement_timeout = {milliseconds}")
            dbapi_connection.commit()

    return engine
