"""One run's claim -> embed -> write loop (see `run.py` for the design)."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg

from embedding_pipeline.lib.embedders.base import Embedder
from embedding_pipeline.lib.embedders.batching import plan_requests
from embedding_pipeline.lib.embedders.errors import EmbeddingError, InputRejectedError
from embedding_pipeline.lib.engine import row_errors
from embedding_pipeline.lib.engine.claims import ClaimStatements, claim_session_name, lock_namespace
from embedding_pipeline.lib.engine.options import EngineOptions, Progress, SyncResult
from embedding_pipeline.lib.engine.preflight import check_model
from embedding_pipeline.lib.engine.row_errors import RowFailure
from embedding_pipeline.lib.engine.sessions import Session, Writers
from embedding_pipeline.lib.store.domain import TableSpec, Window


@dataclass
class _Row:
    id: int
    text: str
    source_hash: str
    failed_before: bool


@dataclass
class _Request:
    rows: list[_Row]

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]


class Pipeline:
    """One run's claim → embed → write loop (see the module docstring)."""

    def __init__(
        self,
        session: Session,
        spec: TableSpec,
        embedder: Embedder,
        window: Window,
        options: EngineOptions,
        on_progress: Callable[[Progress], None] | None,
        result: SyncResult,
    ) -> None:
        self.session = session
        self.spec = spec
        self.embedder = embedder
        self.options = options
        self.on_progress = on_progress
        self.result = result
        self.started = time.monotonic()
        self.last_report = self.started
        self.workers = options.workers(embedder)
        self.request_rows = options.request_rows(embedder)
        self.claim_rows = options.claim_rows(embedder)
        self.queue: deque[_Request] = deque()
        self.held: set[int] = set()
        self.to_release: list[int] = []
        self.after = -(2**63)
        self.exhausted = False
        self.swept_again = False
        self.fatal: BaseException | None = None
        self.writers: Writers | None = None
        #: Writes handed to the writers and not yet accounted.
        self.writing: dict[Future[int], _Request] = {}
        #: Most requests sent and not yet written (in flight at the provider, or finished
        #: and waiting for or in a writer): what a crash can make the next run send again.
        #: New requests wait while writers lag behind, so finished vectors never pile up.
        self.unwritten_bound = self.workers
        #: Called once, on the session's connection, before the first vectors are written.
        self.before_first_write: Callable[[psycopg.Connection], None] | None = None
        self.namespace = lock_namespace(spec)
        self.sql = ClaimStatements(spec, embedder.model_id, window)
        self.session_name = claim_session_name(options.session_label)
        session.on_reconnect = self._after_reconnect
        self._prepare(session.conn, claim_session=self.session_name)

    @staticmethod
    def _prepare(conn: psycopg.Connection, *, claim_session: str | None = None) -> None:
        """A session ready to write (its staging table); with `claim_session`, the run's
        claiming session, named so that checks can tell its locks from any other
        (`claimed_elsewhere_expr`) and name the run."""
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ep_staging "
            "(id bigint, hash text, embedding vector) ON COMMIT DELETE ROWS"
        )
        if claim_session is not None:
            conn.execute(
                "SELECT set_config('application_name', %(name)s, false)",
                {"name": claim_session},
            )
        conn.commit()

    def _after_reconnect(self) -> None:
        """A new session holds none of the old one's locks: take back those still free
        (compare-and-set keeps any row another run took meanwhile correct)."""
        conn = self.session.conn
        self._prepare(conn, claim_session=self.session_name)
        self.to_release.clear()
        if self.held:
            kept = conn.execute(
                self.sql.relock, {"ids": sorted(self.held), "namespace": self.namespace}
            ).fetchall()
            conn.commit()
            self.held = {int(r[0]) for r in kept}

    @contextmanager
    def _transaction(self, conn: psycopg.Connection) -> Iterator[None]:
        """One short transaction that first releases the locks of rows committed before."""
        with conn.transaction():
            if self.to_release:
                conn.execute(
                    self.sql.release, {"ids": self.to_release, "namespace": self.namespace}
                )
                self.to_release = []
            yield

    # --- claim ------------------------------------------------------------------------

    def _claim(self) -> list[_Row]:
        def op(conn: psycopg.Connection) -> list[_Row]:
            with self._transaction(conn):
                candidates = conn.execute(
                    self.sql.claim,
                    {
                        **self.sql.window_params,
                        "after": self.after,
                        "limit": self.claim_rows,
                        "namespace": self.namespace,
                    },
                ).fetchall()
                if not candidates:
                    self.exhausted = True
                    return []
                self.after = candidates[-1][0]
                # a model switch may have swapped the column since the run started
                check_model(conn, self.spec, self.embedder)
                locked = [rid for rid, ok in candidates if ok]
                self.result.skipped_locked += len(candidates) - len(locked)
                self.held.update(locked)
                rows = [
                    _Row(int(rid), text, digest, bool(failed))
                    for rid, text, digest, failed in conn.execute(
                        self.sql.reread, {"ids": locked}
                    ).fetchall()
                ]
            self.result.claims += 1
            done_elsewhere = set(locked) - {r.id for r in rows}
            self._release(done_elsewhere)
            return rows

        rows = self.session.run(op)
        assert isinstance(rows, list)
        return rows

    def _plan(self, rows: list[_Row]) -> None:
        """Requests for a claim: rows that failed before go alone (one bad row must not
        take others down twice), empty texts are recorded at once, the rest sorted by
        length so each request carries texts of similar size."""
        empty = [r for r in rows if not r.text.strip()]
        if empty:
            self.result.empty_text_ids.extend(r.id for r in empty)
            self._record_failures(
                [
                    RowFailure(r.id, r.source_hash, row_errors.EMPTY_TEXT, "nothing to embed")
                    for r in empty
                ],
                empty=True,
            )
        rest = sorted((r for r in rows if r.text.strip()), key=lambda r: len(r.text))
        self.queue.extend(_Request([r]) for r in rest if r.failed_before)
        fresh = [r for r in rest if not r.failed_before]
        budgets = [self.embedder.request_tokens(r.text) for r in fresh]
        for start, end in plan_requests(budgets, self.request_rows, self.embedder.max_batch_tokens):
            self.queue.append(_Request(fresh[start:end]))

    # --- write ------------------------------------------------------------------------

    def _write(self, request: _Request, vectors: np.ndarray) -> None:
        """Write a finished request: on a writer connection when there are writers (the
        rows are accounted and released when it committed, `_written`), else here."""
        if self.before_first_write is not None:
            # on the run's connection, before any write is even handed to a writer
            first, self.before_first_write = self.before_first_write, None
            self.session.run(first)
        if self.writers is not None:

            def apart(conn: psycopg.Connection) -> int:
                with conn.transaction():
                    return self._apply(conn, request, vectors)

            self.writing[self.writers.submit(apart)] = request
            return

        def op(conn: psycopg.Connection) -> int:
            with self._transaction(conn):
                return self._apply(conn, request, vectors)

        written = self.session.run(op)
        assert isinstance(written, int)
        self._wrote(request, written)

    def _apply(self, conn: psycopg.Connection, request: _Request, vectors: np.ndarray) -> int:
        """Stage the vectors and store those whose row still has the embedded text, inside
        the caller's transaction; the number stored. Touches no state of the run: a
        writer thread calls it."""
        with conn.cursor().copy(
            "COPY ep_staging (id, hash, embedding) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "text", "vector"])
            for row, vector in zip(request.rows, vectors, strict=True):
                copy.write_row((row.id, row.source_hash, vector))
        # one primary-key probe per staged row at every table size: the staging table has
        # no statistics, and a hash join would scan the whole table
        conn.execute(
            "SELECT set_config('enable_hashjoin', 'off', true), "
            "set_config('enable_mergejoin', 'off', true)"
        )
        written = {
            int(r[0])
            for r in conn.execute(self.sql.write, {"model_id": self.embedder.model_id}).fetchall()
        }
        retried = [r.id for r in request.rows if r.failed_before and r.id in written]
        row_errors.clear_rows(conn, self.spec, retried)
        return len(written)

    def _written(self, request: _Request, future: Future[int]) -> None:
        """A writer finished: account its rows, or fail the run when it could not write
        (its rows were not written and stay pending; the run's counts exclude them)."""
        try:
            written = future.result()
        except Exception as exc:
            self.fatal = self.fatal or exc
            self._release(r.id for r in request.rows)
            return
        self._wrote(request, written)

    def _wrote(self, request: _Request, written: int) -> None:
        self.result.embedded += written
        self.result.changed_during_run += len(request.rows) - written
        self._release(r.id for r in request.rows)

    def _record_failures(self, failures: list[RowFailure], *, empty: bool = False) -> None:
        """Record rows that cannot be embedded (refused by the provider, or `empty` text:
        nothing to embed, counted apart); those given up lose their old vector."""

        def op(conn: psycopg.Connection) -> int:
            with self._transaction(conn):
                return row_errors.record_failures(
                    conn, self.spec, self.embedder.model_id, failures, self.options.row_errors
                )

        withdrawn = self.session.run(op)
        assert isinstance(withdrawn, int)
        self.result.withdrawn += withdrawn
        if not empty:
            self.result.failed += len(failures)
            for f in failures:
                if len(self.result.failed_samples) < 20:
                    self.result.failed_samples.append((f.row_id, f.message))
        self._release(f.row_id for f in failures)

    def _release(self, ids: Iterable[int]) -> None:
        for rid in ids:
            if rid in self.held:
                self.held.discard(rid)
                self.to_release.append(rid)

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        inflight: dict[Future[np.ndarray], _Request] = {}
        self.writers = self._open_writers()
        self.unwritten_bound = self.workers + (self.writers.count if self.writers else 0)
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="embed")
        try:
            while True:
                self._top_up()
                while (
                    self.fatal is None
                    and self.queue
                    and len(inflight) < self.workers
                    and len(inflight) + len(self.writing) < self.unwritten_bound
                ):
                    request = self.queue.popleft()
                    inflight[pool.submit(self.embedder.embed, request.texts)] = request
                if not inflight and not self.writing:
                    if self.fatal is None and self.exhausted and not self.queue:
                        if self._sweep_again():
                            continue
                        break
                    if self.fatal is not None:
                        break
                    continue
                pending: list[Future[Any]] = [*inflight, *self.writing]
                wait(
                    pending,
                    timeout=self.options.progress_interval_seconds,
                    return_when=FIRST_COMPLETED,
                )
                for future in [f for f in inflight if f.done()]:
                    self._finish(inflight.pop(future), future)
                for written in [f for f in self.writing if f.done()]:
                    self._written(self.writing.pop(written), written)
                self._report()
        finally:
            for future in inflight:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self._close_writers()
            self._release_all()
        self._report(final=True)
        if self.fatal is not None:
            raise self.fatal

    def _sweep_again(self) -> bool:
        """Once the window is exhausted: if rows were skipped because another run held
        them, walk the window once more. Rows that run released without embedding them
        (it failed, or was killed) are this run's to embed; rows still held are that
        run's."""
        if self.swept_again or not self.result.skipped_locked:
            return False
        self.swept_again = True
        self.after = -(2**63)
        self.exhausted = False
        return True

    def _open_writers(self) -> Writers | None:
        """Writer connections, when the options ask for more than one writing connection
        and the run can open connections (`reconnect`); else the run's own writes."""
        count = self.options.write_connections
        if count <= 1 or self.session.reconnect is None:
            return None
        connect, seconds = self.session.reconnect, self.options.reconnect_seconds
        return Writers.open(count, connect, seconds, self.result, self._prepare)

    def _close_writers(self) -> None:
        """Let the writes in flight finish and account them (a failed run's counts include
        what it wrote), then close the writer connections."""
        if self.writers is None:
            return
        self.writers.close()
        for future, request in list(self.writing.items()):
            if not future.cancelled():
                self._written(request, future)
            else:
                self._release(r.id for r in request.rows)
        self.writing.clear()
        self.writers = None

    def _top_up(self) -> None:
        """Claim more rows while the workers could run dry soon."""
        while (
            self.fatal is None
            and not self.exhausted
            and len(self.queue) < 2 * self.workers
            and len(self.held) < 2 * self.claim_rows
        ):
            rows = self._claim()
            if rows:
                self._plan(rows)

    def _finish(self, request: _Request, future: Future[np.ndarray]) -> None:
        try:
            vectors = future.result()
        except InputRejectedError as exc:
            self._refused(request, exc)
            return
        except EmbeddingError as exc:
            ids = [r.id for r in request.rows]
            first, last = min(ids), max(ids)
            self.fatal = self.fatal or EmbeddingError(
                f"{exc} (request of {len(request.rows)} rows, ids {first}..{last}: its rows "
                f"were not written; {self.result.embedded} rows written before stay)"
            )
            self._release(r.id for r in request.rows)
            return
        self.result.provider_requests += 1
        self._write(request, vectors)

    def _refused(self, request: _Request, exc: InputRejectedError) -> None:
        """Split a refused request in halves (ahead of the queue) until the rows the
        provider refuses are alone, then record them."""
        self.result.isolation_requests += 1
        if len(request.rows) > 1:
            middle = len(request.rows) // 2
            self.queue.appendleft(_Request(request.rows[middle:]))
            self.queue.appendleft(_Request(request.rows[:middle]))
            return
        [row] = request.rows
        self._record_failures(
            [RowFailure(row.id, row.source_hash, f"HTTP {exc.status}", _one_line(str(exc)))]
        )
        if self.result.embedded == 0 and self.result.failed >= self.options.refuse_all_after:
            self.fatal = EmbeddingError(
                f"{self.embedder.model_id} refused each of the first {self.result.failed} "
                f"rows tried alone and embedded none; the provider rejects every input, "
                f"not a few rows (last answer: {_one_line(str(exc))})"
            )

    def _release_all(self) -> None:
        """Give back every lock still held (unless the session died, which freed them).
        Always a round trip: while the writers wrote, the run's connection may have been
        lost unnoticed, and the work after the load (the index build) needs it back."""
        self._release(list(self.held))
        if self.session.lost:
            return

        def op(conn: psycopg.Connection) -> None:
            conn.rollback()
            conn.execute(self.sql.release, {"ids": self.to_release, "namespace": self.namespace})
            conn.commit()

        with contextlib.suppress(psycopg.Error):  # the locks end with the session
            self.session.run(op)
        self.to_release = []

    def _report(self, *, final: bool = False) -> None:
        """A progress line every `progress_interval_seconds`, and a last one at the end of
        a run that reported before (a shorter run's summary says the same: one event-log
        write less per small run)."""
        now = time.monotonic()
        if self.on_progress is None:
            return
        if final and self.last_report == self.started:
            return
        if not final and now - self.last_report < self.options.progress_interval_seconds:
            return
        self.last_report = now
        self.on_progress(
            Progress(
                embedded=self.result.embedded,
                failed=self.result.failed,
                pending_at_start=self.result.pending_at_start,
                seconds=now - self.started,
            )
        )


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit] + "…"
