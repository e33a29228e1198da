"""Two runs over the same rows at once (a sensor run and a backfill, or two overlapping
backfills), as separate OS processes: every row is embedded exactly once and every write
lands. And the compare-and-set: text edited while its vector is computed is not
overwritten by the stale vector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from embedding_pipeline.lib import db
from embedding_pipeline.lib.sync import Window, sync_embeddings
from embedding_pipeline.lib.text import content_hash
from embedding_pipeline_tests.incremental_helpers import (
    HashEmbedder,
    insert_messages,
    logged_texts,
)

ROOT = Path(__file__).parent.parent
MONTHS = [datetime(2024, m, 10, tzinfo=UTC) for m in (3, 4, 5, 6)]


def worker(url: str, start: str, end: str, log: Path, go: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedding_pipeline_tests.incremental_helpers",
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
    assert sum(m["rows_skipped_locked"] for m in metadata) > 0, "the runs never met"

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
