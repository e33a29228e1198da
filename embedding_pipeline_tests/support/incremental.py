"""Test doubles and data builders for the incremental-sync tests.

`HashEmbedder` is a deterministic stand-in for a provider: a text always maps to the same
unit vector, every call is recorded (in memory, and in a file for tests that run the
pipeline in other processes), and it can be slowed down or made to fail after N calls.
The module also runs as a worker process: `python -m embedding_pipeline_tests.support.incremental
materialize ...` materializes embedding partitions with that embedder (used by the
concurrency and SIGKILL tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import psycopg
from pydantic import Field

from embedding_pipeline.lib.embedders import Embedder, EmbeddingError
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.settings import EngineSettings, Settings
from embedding_pipeline.testing.vectors import fake_vector

DIMENSION = 384
#: Every text embedded in this process, one list per provider call.
CALLS: list[list[str]] = []


class HashEmbedder(Embedder):
    """Unit vectors derived from the text's SHA-256: same text, same vector."""

    max_batch_size = 256

    def __init__(
        self,
        *,
        model_id: str = "test:hash",
        dimension: int = DIMENSION,
        delay: float = 0.0,
        fail_after_calls: int | None = None,
        log_path: str | None = None,
    ) -> None:
        super().__init__()
        self.model_id = model_id
        self.dimension = dimension
        self._delay = delay
        self._fail_after = fail_after_calls
        self._log_path = log_path
        self._calls = 0

    def _embed(self, texts: list[str]) -> np.ndarray:
        self._calls += 1
        if self._fail_after is not None and self._calls > self._fail_after:
            raise EmbeddingError(f"{self.model_id}: provider down after {self._fail_after} calls")
        if self._delay:
            time.sleep(self._delay)
        CALLS.append(list(texts))
        if self._log_path:
            with open(self._log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps({"pid": os.getpid(), "texts": texts}) + "\n")
        return np.stack([fake_vector(t, self.dimension) for t in texts])


class HashEmbedderResource(EmbedderResource):
    """`EmbedderResource` whose `build()` returns a `HashEmbedder`."""

    model_tag: str = Field(default="test:hash")
    delay: float = 0.0
    fail_after_calls: int = -1
    log_path: str = ""

    @property
    def model_id(self) -> str:
        return self.model_tag

    def build(self) -> Embedder:
        return HashEmbedder(
            model_id=self.model_tag,
            delay=self.delay,
            fail_after_calls=self.fail_after_calls if self.fail_after_calls >= 0 else None,
            log_path=self.log_path or None,
        )


def logged_texts(path: Path) -> dict[int, list[str]]:
    """Texts embedded per process id, from a `log_path` file."""
    out: dict[int, list[str]] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        out.setdefault(int(entry["pid"]), []).extend(entry["texts"])
    return out


def add_extraction(conn: psycopg.Connection, source: str = "test") -> int:
    row = conn.execute(
        "INSERT INTO extractions (source) VALUES (%s) RETURNING id", (source,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def insert_messages(
    conn: psycopg.Connection,
    moments: Sequence[datetime],
    *,
    extraction_id: int | None = None,
    chat_id: int = 77,
    prefix: str = "message",
) -> list[int]:
    """Insert one message per moment with unique text; returns their ids (committed)."""
    start = conn.execute(
        "SELECT coalesce(max(telegram_message_id), 0) FROM messages WHERE chat_id = %s", (chat_id,)
    ).fetchone()
    assert start is not None
    ids = []
    for offset, moment in enumerate(moments, start=int(start[0]) + 1):
        row = conn.execute(
            "INSERT INTO messages (chat_id, telegram_message_id, sent_at, content, "
            "extraction_id) VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (
                chat_id,
                offset,
                moment,
                f"{prefix} {chat_id}-{offset}: notes about item {offset % 13}",
                extraction_id,
            ),
        ).fetchone()
        assert row is not None
        ids.append(int(row[0]))
    conn.commit()
    return ids


def embedded_state(
    conn: psycopg.Connection, table: str = "messages"
) -> dict[int, tuple[str | None, datetime | None]]:
    """id -> (model, embedded_at) of every row."""
    rows = conn.execute(
        f"SELECT id, embedding_model, embedded_at FROM {table} ORDER BY id"  # noqa: S608
    ).fetchall()
    conn.rollback()
    return {int(r[0]): (r[1], r[2]) for r in rows}


def figures(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A materialization's metadata values by key, with the engine's `run_details` (one
    JSON value) spread beside the month's and the run's own figures."""
    values = {k: getattr(v, "value", v) for k, v in metadata.items()}
    details = values.get("run_details")
    return {**details, **values} if isinstance(details, dict) else values


def materialization_metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """Asset name -> `figures` of its (first) materialization in a run."""
    out: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        m = event.step_materialization_data.materialization
        out.setdefault(m.asset_key.to_user_string(), figures(m.metadata))
    return out


def _materialize_main(argv: Sequence[str]) -> int:
    """Worker: materialize message embeddings for a partition range with a HashEmbedder,
    print the asset's metadata as JSON."""
    from embedding_pipeline.definitions import build_definitions

    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--start", required=True)
    parser.add_argument("--end", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--log", default="")
    parser.add_argument("--asset", default="message_embeddings")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--write-connections", type=int, default=EngineSettings.write_connections)
    parser.add_argument(
        "--claim-size", type=int, default=None, help="rows per claim (default: the batch size)"
    )
    parser.add_argument(
        "--go-file",
        default="",
        help="announce readiness in GO_FILE.ready-PID, "
        "then wait for GO_FILE to exist before materializing",
    )
    args = parser.parse_args(argv)
    # claims as small as a batch, so that two runs over the same rows take turns
    claim_size = args.batch_size if args.claim_size is None else (args.claim_size or None)
    settings = Settings(
        database_url=args.database_url,
        engine=EngineSettings(claim_size=claim_size, write_connections=args.write_connections),
    )
    resources = {
        "postgres": PostgresResource(database_url=args.database_url),
        "embedder": HashEmbedderResource(
            batch_size=args.batch_size,
            delay=args.delay,
            log_path=args.log,
            concurrency=args.concurrency,
        ),
    }
    defs = build_definitions(settings, resources)
    if args.go_file:
        Path(f"{args.go_file}.ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 120
        while not Path(args.go_file).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [defs.get_assets_def(args.asset)],
            resources=resources,
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": args.start,
                "dagster/asset_partition_range_end": args.end,
            },
            raise_on_error=False,
        )
        print(json.dumps(materialization_metadata(result).get(args.asset, {}), default=str))
        return 0 if result.success else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["materialize"]:
        sys.exit(_materialize_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} materialize --database-url URL --start KEY --end KEY")
