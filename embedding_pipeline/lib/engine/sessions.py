"""A run's database connections: its own session (re-opened, bounded, when lost) and the
writer threads that write finished requests on connections of their own."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from queue import SimpleQueue

import psycopg

from embedding_pipeline.lib.engine.options import SyncResult


class Session:
    """The run's database connection: replaced when lost (bounded), closed at the end if
    the engine opened it."""

    def __init__(
        self,
        conn: psycopg.Connection,
        reconnect: Callable[[], psycopg.Connection] | None,
        reconnect_seconds: float,
        result: SyncResult,
        *,
        own: bool = False,
    ) -> None:
        self.conn = conn
        self._own = own
        self.reconnect = reconnect
        self._reconnect_seconds = reconnect_seconds
        self._result = result
        self.on_reconnect: Callable[[], None] | None = None

    @property
    def lost(self) -> bool:
        return self.conn.closed or self.conn.broken

    def run(self, op: Callable[[psycopg.Connection], object]) -> object:
        """`op(conn)`; when the connection is lost under it, reconnect and call it again."""
        while True:
            try:
                return op(self.conn)
            except psycopg.OperationalError:
                if not self.lost or self.reconnect is None:
                    raise
                self._replace()

    def _replace(self) -> None:
        assert self.reconnect is not None
        fresh = reconnect_with_backoff(self.reconnect, self._reconnect_seconds)
        if self._own:
            self.conn.close()
        self.conn, self._own = fresh, True
        self._result.reconnects += 1
        if self.on_reconnect is not None:
            self.on_reconnect()

    def close(self) -> None:
        if self._own:
            self.conn.close()


def reconnect_with_backoff(
    connect: Callable[[], psycopg.Connection], seconds: float
) -> psycopg.Connection:
    """A new connection in place of a lost one, tried with backoff for up to `seconds`;
    then the run fails with a one-line reason."""
    deadline = time.monotonic() + seconds
    delay = 0.5
    while True:
        try:
            return connect()
        except psycopg.OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise psycopg.OperationalError(
                    f"lost the database connection and could not reconnect within "
                    f"{seconds:g}s: {str(exc).splitlines()[0]}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class Writers:
    """Threads that write finished requests, each on a connection of its own, so that
    PostgreSQL applies several requests at once on several cores while the run's own
    connection keeps claiming. A writer holds no row locks (they are the run session's,
    released by it after the write committed); a lost writer connection is re-opened like
    the run's own (`Session`), and a write that fails for good fails the run, its rows
    left pending for the next run."""

    def __init__(self, sessions: list[Session]) -> None:
        self._sessions = sessions
        self._idle: SimpleQueue[Session] = SimpleQueue()
        for session in sessions:
            self._idle.put(session)
        self._pool = ThreadPoolExecutor(max_workers=len(sessions), thread_name_prefix="write")

    @property
    def count(self) -> int:
        return len(self._sessions)

    @classmethod
    def open(
        cls,
        count: int,
        connect: Callable[[], psycopg.Connection],
        reconnect_seconds: float,
        result: SyncResult,
        prepare: Callable[[psycopg.Connection], None],
    ) -> Writers | None:
        """Up to `count` writers; fewer when the server refuses more connections (its
        `max_connections`), None when it refuses the first: the run then writes on its
        own connection rather than fail for want of a faster way."""
        sessions: list[Session] = []
        for _ in range(count):
            try:
                conn = connect()
            except psycopg.OperationalError:
                break
            session = Session(conn, connect, reconnect_seconds, result, own=True)
            session.on_reconnect = lambda s=session: prepare(s.conn)
            sessions.append(session)
            try:
                prepare(conn)
            except BaseException:
                for opened in sessions:
                    opened.close()
                raise
        return cls(sessions) if sessions else None

    def submit(self, op: Callable[[psycopg.Connection], int]) -> Future[int]:
        """Run `op(conn)` on an idle writer connection (reconnecting under it if lost)."""
        return self._pool.submit(self._run, op)

    def _run(self, op: Callable[[psycopg.Connection], int]) -> int:
        session = self._idle.get()
        try:
            written = session.run(op)
        finally:
            self._idle.put(session)
        assert isinstance(written, int)
        return written

    def close(self) -> None:
        """Wait for the writes in flight, then close the connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for session in self._sessions:
            session.close()
