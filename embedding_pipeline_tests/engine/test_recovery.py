"""Runs recover: the database stopped and started mid-run (on a server of this module's
own, started with the project's `lib/store/pgserver.py`), with the HNSW index in place or dropped
for a bulk load; a run that cannot get its database back; and a run that cannot reach its
provider, which must leave the index alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import dagster as dg
import psycopg
import pytest

from embedding_pipeline.lib.embedders import LOCAL_DIMENSION
from embedding_pipeline.lib.engine.options import EngineOptions
from embedding_pipeline.lib.engine.run import sync_embeddings
from embedding_pipeline.lib.quality.index import index_builds
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.catalog import index_state
from embedding_pipeline.lib.store.domain import Window
from embedding_pipeline.lib.store.hnsw import hnsw_index_name
from embedding_pipeline.lib.store.pgserver import EmbeddedPostgres, temporary_server
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.settings import HnswSettings, Settings
from embedding_pipeline.testing.fault_server import FaultServer
from embedding_pipeline_tests.support.database import create_database
from embedding_pipeline_tests.support.faults import (
    ENGINE,
    OPENAI_ID,
    assert_embedded,
    materialize,
    metadata,
    month_rows,
    resource,
)

MONTH = "2025-03-01"
ROWS = 96


@pytest.fixture(scope="module")
def pg() -> Iterator[EmbeddedPostgres]:
    with temporary_server("ep-test-recovery-") as server:
        yield server


def prepared(
    pg: EmbeddedPostgres, name: str, bulk_load_min_rows: int
) -> tuple[Settings, list[int]]:
    """A new database with the schema (HNSW index included) and ROWS pending messages."""
    url = create_database(pg, name)
    settings = Settings(
        database_url=url, engine=ENGINE, hnsw=HnswSettings(bulk_load_min_rows=bulk_load_min_rows)
    )
    with db.connection(url, vector=False) as conn:
        ensure_schema(conn, settings, LOCAL_DIMENSION, OPENAI_ID)
    return settings, month_rows(settings, MONTH, ROWS, name)


def index_oid(settings: Settings) -> int | None:
    """The HNSW index's object id (a rebuilt index has a new one), None when missing."""
    name = hnsw_index_name(settings.tables["messages"])
    with db.connection(settings.effective_database_url, vector=False) as conn:
        row = conn.execute("SELECT to_regclass(%s)::oid", (name,)).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def hnsw_state(settings: Settings) -> str | None:
    with db.connection(settings.effective_database_url, vector=False) as conn:
        return index_state(conn, hnsw_index_name(settings.tables["messages"]))


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def restart_database_at(
    fault_server: FaultServer,
    pg: EmbeddedPostgres,
    request_number: int,
    *,
    down_seconds: float = 0.0,
    first: Callable[[], None] | None = None,
) -> None:
    """When the provider receives request `request_number`: `first()`, then stop the
    database (fast shutdown: every session is cut) and start it again `down_seconds`
    later; the request is answered meanwhile."""

    def hook(number: int) -> None:
        if number != request_number:
            return
        if first is not None:
            first()
        pg.stop()
        if down_seconds:
            threading.Timer(down_seconds, pg.start).start()
        else:
            pg.start()

    fault_server.before_answer = hook


@pytest.mark.parametrize(
    ("strategy", "bulk_load_min_rows"), [("incremental", 10_000), ("built after load", 50)]
)
def test_a_database_restart_mid_run_loses_nothing_and_the_index_exists_after(
    strategy: str,
    bulk_load_min_rows: int,
    pg: EmbeddedPostgres,
    fault_server: FaultServer,
    instance: dg.DagsterInstance,
) -> None:
    settings, ids = prepared(pg, f"restart_{bulk_load_min_rows}", bulk_load_min_rows)
    assert hnsw_state(settings) == "valid"
    bulk = strategy == "built after load"
    # a bulk load restarts the database while its index is dropped
    restart_database_at(
        fault_server,
        pg,
        4,
        first=(lambda: wait_for(lambda: hnsw_state(settings) is None)) if bulk else None,
    )

    result = materialize(settings, resource("openai", fault_server, batch_size=8), MONTH, instance)

    assert result.success
    meta = metadata(result)
    assert meta["reconnects"] >= 1 and meta["index_strategy"] == strategy
    assert meta["rows_embedded"] == ROWS
    assert_embedded(settings, ids, OPENAI_ID)
    assert hnsw_state(settings) == "valid"
    # the vectors in memory were written on the new connection, none asked for again
    assert fault_server.snapshot().answered_more_than_once() == []


def test_a_run_without_its_database_fails_in_one_line_and_the_next_builds_the_index(
    pg: EmbeddedPostgres, fault_server: FaultServer
) -> None:
    settings, ids = prepared(pg, "database_gone", 50)
    spec = settings.tables["messages"]
    embedder = resource("openai", fault_server, batch_size=8).build()
    options = EngineOptions(batch_size=8, reconnect_seconds=1.0)
    url = settings.effective_database_url
    restart_database_at(
        fault_server,
        pg,
        4,
        down_seconds=4.0,
        first=lambda: wait_for(lambda: hnsw_state(settings) is None),
    )

    with pytest.raises(psycopg.OperationalError) as failed, db.connection(url) as conn:
        sync_embeddings(
            conn,
            spec,
            embedder,
            Window(),
            options=options,
            index=settings.hnsw,
            reconnect=lambda: db.connect(url),
        )

    message = str(failed.value)
    assert message.startswith("lost the database connection and could not reconnect within 1s: ")
    assert "\n" not in message
    wait_for(lambda: pg.status().running)
    assert hnsw_state(settings) is None  # the run died with its index dropped

    fault_server.before_answer = None
    with db.connection(url) as conn:
        result = sync_embeddings(
            conn, spec, embedder, Window(), options=options, index=settings.hnsw
        )

    assert result.embedded > 0
    assert_embedded(settings, ids, OPENAI_ID)
    assert hnsw_state(settings) == "valid"


def test_a_run_that_cannot_reach_its_provider_leaves_the_index_alone(
    pg: EmbeddedPostgres, fault_server: FaultServer, instance: dg.DagsterInstance
) -> None:
    """Provider down past the retry deadline: the run fails, and it neither dropped nor
    rebuilt the index (a retried run in an outage would otherwise rebuild it each time)."""
    settings, _ = prepared(pg, "provider_down", 50)
    before = index_oid(settings)
    assert before is not None
    fault_server.down()

    result = materialize(
        settings, resource("openai", fault_server, retry_deadline_seconds=0.5), MONTH, instance
    )

    assert not result.success
    assert index_oid(settings) == before
    assert hnsw_state(settings) == "valid"


@pytest.mark.parametrize(("new_rows", "strategy"), [(40, "incremental"), (200, "bulk load")])
def test_a_run_failing_on_its_provider_still_builds_a_missing_index(
    new_rows: int,
    strategy: str,
    pg: EmbeddedPostgres,
    fault_server: FaultServer,
    instance: dg.DagsterInstance,
) -> None:
    """A column with vectors whose index a killed bulk load left missing: the next run
    builds it even when it cannot embed (the provider still down), whether it would have
    loaded incrementally or as a bulk load."""
    settings, _ = prepared(pg, f"missing_index_{new_rows}", 50)
    embedder = resource("openai", fault_server, retry_deadline_seconds=0.5)
    assert materialize(settings, embedder, MONTH, instance).success
    with db.connection(settings.effective_database_url, autocommit=True) as conn:
        conn.execute(f"DROP INDEX {hnsw_index_name(settings.tables['messages'])}")
    month_rows(settings, MONTH, new_rows, f"more {strategy}")
    fault_server.down()

    result = materialize(settings, embedder, MONTH, instance)

    assert not result.success
    assert hnsw_state(settings) == "valid"


@pytest.mark.parametrize("bulk_load_min_rows", [10_000, 50])
def test_a_database_restart_during_the_index_build_is_retried_in_the_same_run(
    bulk_load_min_rows: int, pg: EmbeddedPostgres, fault_server: FaultServer
) -> None:
    """The run's final `CREATE INDEX CONCURRENTLY` (of a missing index, or after a bulk
    load) is cut by a database restart: the run reconnects, drops what the cut build
    left invalid, builds again, and ends with a valid index. An open writing transaction
    holds the build in its first phase, so the restart lands while it is in progress."""
    settings, ids = prepared(pg, f"restart_build_{bulk_load_min_rows}", bulk_load_min_rows)
    spec = settings.tables["messages"]
    url = settings.effective_database_url
    if bulk_load_min_rows > ROWS:  # no bulk load: the index is missing before the run
        with db.connection(url, autocommit=True) as conn:
            conn.execute(f"DROP INDEX {hnsw_index_name(spec)}")
    blocker = db.connect(url, vector=False)
    restarted = threading.Event()
    seen: list[str] = []

    def block(number: int) -> None:
        # when the provider gets the last request (every earlier write done or under way,
        # the build not started): a writer's open transaction will hold the build back
        if number == ROWS // 8:
            blocker.execute("LOCK TABLE messages IN ROW EXCLUSIVE MODE")

    fault_server.before_answer = block

    def block_then_restart() -> None:
        wait_for(lambda: _building(url), 60)
        with db.connection(url, vector=False) as conn:
            seen.extend(index_builds(conn, spec))
        pg.stop()
        pg.start()
        restarted.set()

    watcher = threading.Thread(target=block_then_restart, daemon=True)
    watcher.start()
    embedder = resource("openai", fault_server, batch_size=8).build()
    try:
        with db.connection(url) as conn:
            result = sync_embeddings(
                conn,
                spec,
                embedder,
                Window(),
                options=EngineOptions(batch_size=8),
                index=settings.hnsw,
                reconnect=lambda: db.connect(url),
            )
    finally:
        watcher.join(timeout=120)
        blocker.close()
    assert restarted.is_set()
    # what the index checks report meanwhile: the run's claiming session, building it
    [builder] = seen
    assert builder.startswith("embedding_pipeline claims (pid ") and "is building it" in builder
    assert result.reconnects >= 1
    assert result.index_strategy == "built after load"
    assert hnsw_state(settings) == "valid"
    assert_embedded(settings, ids, OPENAI_ID)


def _building(url: str) -> bool:
    with db.connection(url, vector=False) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_progress_create_index WHERE relid = 'messages'::regclass"
        ).fetchone()
    return bool(row and row[0])
