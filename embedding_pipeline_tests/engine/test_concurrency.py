"""Two runs over the same rows at once (a sensor run and a backfill, or two overlapping
backfills), as separate OS processes: every row is embedded exactly once and every write
lands. And the compare-and-set: text edited while its vector is computed is not
overwritten by the stale vector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import pytest

from embedding_pipeline.lib.engine.options import EngineOptions
from embedding_pipeline.lib.engine.run import sync_embeddings
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.domain import Window
from embedding_pipeline.lib.store.expressions import content_hash
from embedding_pipeline_tests.support.incremental import (
    HashEmbedder,
    insert_messages,
    logged_texts,
)
from embedding_pipeline_tests.support.paths import ROOT

MONTHS = [datetime(2024, m, 10, tzinfo=UTC) for m in (3, 4, 5, 6)]


def worker(url: str, start: str, end: str, log: Path, go: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedding_pipeline_tests.support.incremental",
            "materialize",
            "--database-url",
            url,
            "--start",
            start,
            "--end",
            end,
            "--batch-size",
            "4",
            "--delay",
            "0.05",
            "--log",
            str(log),
            "--go-file",
            str(go),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


def test_two_overlapping_runs_in_parallel_embed_each_row_once(schema, conn, settings, tmp_path):
    ids = insert_messages(conn, [m for m in MONTHS for _ in range(40)], chat_id=1)
    url = settings.effective_database_url
    logs = [tmp_path / "wide.jsonl", tmp_path / "narrow.jsonl"]
    go = tmp_path / "go"
    processes = [
        worker(url, "2024-03-01", "2024-06-01", logs[0], go),
        worker(url, "2024-03-01", "2024-04-01", logs[1], go),
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < 2:
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    metadata = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

    texts = [t for log in logs for per_pid in logged_texts(log).values() for t in per_pid]
    duplicates = [t for t, n in Counter(texts).items() if n > 1]
    assert duplicates == []
    assert len(texts) == len(ids)
    assert sum(m["run_rows_embedded"] for m in metadata) == len(ids)
    assert all(m["run_rows_embedded"] > 0 for m in metadata), "one run did all the work"
    assert sum(m["skipped_locked"] for m in metadata) > 0, "the runs never met"

    rows = conn.execute(
        "SELECT content, embedding, embedding_hash FROM messages WHERE id = ANY(%s)", (ids,)
    ).fetchall()
    conn.rollback()
    assert len(rows) == len(ids)
    for content, vector, digest in rows:
        assert vector is not None and digest == content_hash(content)


class _EditingEmbedder(HashEmbedder):
    """Edits one row's text (from another connection) while its batch is being embedded,
    as the application might while a run is in flight."""

    def __init__(self, url: str, row_id: int) -> None:
        super().__init__()
        self._url = url
        self._row_id = row_id
        self._edited = False

    def _embed(self, texts: list[str]) -> np.ndarray:
        vectors = super()._embed(texts)
        if not self._edited:
            self._edited = True
            with db.connection(self._url, vector=False, autocommit=True) as other:
                other.execute(
                    "UPDATE messages SET content = 'edited mid-run' WHERE id = %s", (self._row_id,)
                )
        return vectors


def test_text_edited_during_a_run_keeps_its_new_text_and_is_embedded_next_time(
    schema, conn, settings
):
    ids = insert_messages(conn, [datetime(2024, 8, 1, tzinfo=UTC)] * 3, chat_id=2)
    window = Window(start=datetime(2024, 8, 1, tzinfo=UTC), end=datetime(2024, 9, 1, tzinfo=UTC))
    spec = settings.tables["messages"]
    with db.connection(settings.effective_database_url) as run:
        result = sync_embeddings(
            run,
            spec,
            _EditingEmbedder(settings.effective_database_url, ids[1]),
            window,
            batch_size=8,
        )
    assert result.embedded == 2
    assert result.changed_during_run == 1
    edited = conn.execute(
        "SELECT content, embedding IS NULL FROM messages WHERE id = %s", (ids[1],)
    ).fetchone()
    conn.rollback()
    assert edited == ("edited mid-run", True)

    embedder = HashEmbedder()
    with db.connection(settings.effective_database_url) as run:
        again = sync_embeddings(run, spec, embedder, window, batch_size=8)
    assert again.embedded == 1
    assert embedder.stats.texts == 1
    row = conn.execute("SELECT embedding_hash FROM messages WHERE id = %s", (ids[1],)).fetchone()
    conn.rollback()
    assert row[0] == content_hash("edited mid-run")


class _CountingConnect:
    """`reconnect` for a run: opens connections and remembers them (the writers')."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list[psycopg.Connection] = []

    def __call__(self) -> psycopg.Connection:
        conn = db.connect(self.url)
        self.opened.append(conn)
        return conn


def advisory_locks_of(conn: psycopg.Connection, pid: int) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s", (pid,)
    ).fetchone()
    conn.rollback()
    return int(row[0])


@pytest.mark.parametrize("write_connections", [1, 2])
def test_writer_connections_embed_each_row_once_and_release_every_lock(
    schema, conn, settings, write_connections
):
    rows = 300
    moment = datetime(2025, write_connections, 1, tzinfo=UTC)
    ids = insert_messages(conn, [moment] * rows, chat_id=3 + write_connections)
    window = Window(start=moment, end=datetime(2025, write_connections + 1, 1, tzinfo=UTC))
    url = settings.effective_database_url
    connect = _CountingConnect(url)
    embedder = _EditingEmbedder(url, ids[150])
    options = EngineOptions(batch_size=8, concurrency=4, write_connections=write_connections)
    with db.connection(url) as run:
        result = sync_embeddings(
            run, settings.tables["messages"], embedder, window, options=options, reconnect=connect
        )
        assert advisory_locks_of(conn, run.info.backend_pid) == 0

    # one connection per writer, none for the old way; all closed by the run
    assert len(connect.opened) == (write_connections if write_connections > 1 else 0)
    assert all(c.closed for c in connect.opened)
    assert embedder.stats.texts == rows
    assert result.embedded == rows - 1 and result.changed_during_run == 1
    assert result.reconnects == 0
    stored = conn.execute(
        "SELECT id, content, embedding IS NOT NULL, embedding_hash FROM messages "
        "WHERE id = ANY(%s)",
        (ids,),
    ).fetchall()
    conn.rollback()
    assert len(stored) == rows
    for rid, content, embedded, digest in stored:
        if rid == ids[150]:
            assert (content, embedded) == ("edited mid-run", False)
        else:
            assert embedded and digest == content_hash(content)


def test_a_run_whose_writer_connections_are_refused_writes_on_its_own(schema, conn, settings):
    moment = datetime(2025, 6, 1, tzinfo=UTC)
    ids = insert_messages(conn, [moment] * 40, chat_id=8)

    def refused() -> psycopg.Connection:
        raise psycopg.OperationalError("FATAL:  sorry, too many clients already")

    options = EngineOptions(batch_size=8, write_connections=2)
    with db.connection(settings.effective_database_url) as run:
        result = sync_embeddings(
            run,
            settings.tables["messages"],
            HashEmbedder(),
            Window(start=moment, end=datetime(2025, 7, 1, tzinfo=UTC)),
            options=options,
            reconnect=refused,
        )

    assert result.embedded == len(ids) and result.reconnects == 0


class _WriterKillingEmbedder(HashEmbedder):
    """Cuts the writer connections' sessions (from another connection) once some requests
    were answered, as a failover or an idle timeout would."""

    def __init__(self, url: str, connect: _CountingConnect) -> None:
        super().__init__()
        self._url = url
        self._connect = connect
        self._lock = threading.Lock()
        self._answered = 0

    def _embed(self, texts: list[str]) -> np.ndarray:
        vectors = super()._embed(texts)
        with self._lock:
            self._answered += 1
            if self._answered == 5:
                pids = [c.info.backend_pid for c in self._connect.opened]
                with db.connection(self._url, vector=False, autocommit=True) as other:
                    other.execute(
                        "SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) p", (pids,)
                    )
        return vectors


def test_a_lost_writer_connection_is_reopened_and_loses_no_rows(schema, conn, settings):
    rows = 200
    moment = datetime(2024, 11, 1, tzinfo=UTC)
    ids = insert_messages(conn, [moment] * rows, chat_id=9)
    window = Window(start=moment, end=datetime(2024, 12, 1, tzinfo=UTC))
    url = settings.effective_database_url
    connect = _CountingConnect(url)
    options = EngineOptions(batch_size=8, concurrency=2, write_connections=2)
    with db.connection(url) as run:
        result = sync_embeddings(
            run,
            settings.tables["messages"],
            _WriterKillingEmbedder(url, connect),
            window,
            options=options,
            reconnect=connect,
        )
        assert advisory_locks_of(conn, run.info.backend_pid) == 0

    assert result.reconnects >= 1 and len(connect.opened) > 2
    assert result.embedded == rows
    missing = conn.execute(
        "SELECT count(*) FROM messages WHERE id = ANY(%s) AND embedding IS NULL", (ids,)
    ).fetchone()
    conn.rollback()
    assert missing[0] == 0
