"""Incremental sync end to end: sensor ticks executed as runs, what gets (re-)embedded,
crashes (an embedder that fails, a SIGKILLed run), the backlog and its backfill from the
CLI, the HNSW index strategy, and deletes. Provider calls are counted by `HashEmbedder`.

The sensor-driven tests are consecutive steps of one scenario sharing the module's
database and the sensor's cursor (as the daemon carries it), so they run in file order:
run the module, not one of those tests alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.lib.engine.index_lifecycle import bulk_load_wanted
from embedding_pipeline.lib.quality.backlog import (
    backlog,
    partition_range,
    render_markdown,
    table_pending,
)
from embedding_pipeline.lib.sources.extraction_file import load_extraction
from embedding_pipeline.lib.sources.ingest import ingest
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.catalog import index_state
from embedding_pipeline.lib.store.hnsw import bulk_load_lock_key, hnsw_index_name
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.partitions import monthly_partitions, partition_key_for
from embedding_pipeline.resources import PostgresResource
from embedding_pipeline.search import Searcher
from embedding_pipeline.search.api import engine_for
from embedding_pipeline.sensors import SENSOR_NAME
from embedding_pipeline.settings import HnswSettings, Settings
from embedding_pipeline_tests.support import incremental as helpers
from embedding_pipeline_tests.support.database import ingest_small_chat, small_export_with_text
from embedding_pipeline_tests.support.incremental import (
    CALLS,
    HashEmbedderResource,
    add_extraction,
    embedded_state,
    insert_messages,
    materialization_metadata,
)
from embedding_pipeline_tests.support.paths import DATA, ROOT

VENV_BIN = Path(sys.executable).parent
MESSAGES = "message_embeddings"


@pytest.fixture(scope="module")
def hash_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    return {
        "postgres": PostgresResource(database_url=settings.effective_database_url),
        "embedder": HashEmbedderResource(batch_size=4),
    }


@pytest.fixture(scope="module")
def hash_defs(settings, hash_resources) -> dg.Definitions:
    return build_definitions(settings, hash_resources)


@pytest.fixture(scope="module")
def cursor_state():
    """The sensor's cursor, carried from tick to tick; "0" replays every extraction (the
    sample chat is ingested before the first tick)."""
    return {"cursor": "0"}


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


def embedded_texts() -> list[str]:
    return [text for call in CALLS for text in call]


def tick_and_run(defs, resources, instance, state) -> list[dict[str, dict[str, object]]]:
    """One sensor tick, then each requested run executed as the daemon would (same
    partition, assets and tags); returns each run's materialization metadata."""
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    with dg.build_sensor_context(
        instance=instance, cursor=state["cursor"], definitions=defs, resources=resources
    ) as context:
        result = sensor(context)
    state["cursor"] = result.cursor
    metadata = []
    for request in result.run_requests or []:
        run = dg.materialize(
            [defs.get_assets_def(k) for k in request.asset_selection],
            resources=resources,
            instance=instance,
            partition_key=request.partition_key,
            tags=request.tags,
            selection=request.asset_selection,
        )
        assert run.success
        metadata.append(materialization_metadata(run))
    return metadata


def null_count(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM messages WHERE embedding IS NULL) + "
        "(SELECT count(*) FROM topics WHERE embedding IS NULL) + "
        "(SELECT count(*) FROM atoms WHERE embedding IS NULL)"
    ).fetchone()
    conn.rollback()
    return int(row[0])


def materialize_all(defs, resources, instance, names=(MESSAGES,), **kwargs):
    keys = monthly_partitions("2024-01-01").get_partition_keys()
    return dg.materialize(
        [defs.get_assets_def(n) for n in names],
        resources=resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
        **kwargs,
    )


def test_sensor_runs_embed_exactly_the_new_rows(
    small_data, hash_defs, hash_resources, instance, cursor_state, conn
):
    runs = tick_and_run(hash_defs, hash_resources, instance, cursor_state)
    total = sum(int(m["run_rows_embedded"]) for run in runs for m in run.values())
    assert total == 4 + 2 + 3
    assert len(embedded_texts()) == total
    assert null_count(conn) == 0

    CALLS.clear()
    extraction_id = add_extraction(conn)
    new_ids = insert_messages(
        conn,
        [datetime(2025, 10, 20, tzinfo=UTC), datetime(2025, 11, 2, tzinfo=UTC)],
        extraction_id=extraction_id,
    )
    assert null_count(conn) == 2
    runs = tick_and_run(hash_defs, hash_resources, instance, cursor_state)
    assert len(runs) == 1  # one run of message embeddings over October and November
    assert sum(int(run[MESSAGES]["run_rows_embedded"]) for run in runs) == 2
    assert sum(int(run[MESSAGES]["provider_requests"]) for run in runs) == 1  # one request
    texts = conn.execute("SELECT content FROM messages WHERE id = ANY(%s)", (new_ids,)).fetchall()
    assert sorted(embedded_texts()) == sorted(t for (t,) in texts)
    assert null_count(conn) == 0


def test_an_edited_message_is_the_only_row_embedded_again(
    small_data, hash_defs, hash_resources, instance, cursor_state, conn, tmp_path
):
    before = embedded_state(conn)
    export = small_export_with_text(tmp_path, 3, "Volume raised to 300 GB.")
    ingest(conn, small_data, export, load_extraction(DATA / "small_extraction.json"))
    runs = tick_and_run(hash_defs, hash_resources, instance, cursor_state)
    assert [sorted(run) for run in runs] == [[MESSAGES]]
    assert embedded_texts() == ["Volume raised to 300 GB."]
    after = embedded_state(conn)
    changed = [i for i in after if after[i] != before[i]]
    row = conn.execute(
        "SELECT id FROM messages WHERE content = 'Volume raised to 300 GB.'"
    ).fetchone()
    assert changed == [row[0]]


def test_an_up_to_date_table_is_never_sent_to_the_provider(
    small_data, hash_defs, hash_resources, instance, conn
):
    assert null_count(conn) == 0
    result = materialize_all(
        hash_defs, hash_resources, instance, names=(MESSAGES, "topic_embeddings", "atom_embeddings")
    )
    assert result.success
    assert CALLS == []
    meta = materialization_metadata(result)
    assert all(m["run_rows_embedded"] == 0 and m["provider_requests"] == 0 for m in meta.values())
    assert runs_pending(conn) == 0


def runs_pending(conn: psycopg.Connection) -> int:
    partitions_def = monthly_partitions("2024-01-01")
    rows = backlog(
        conn,
        Settings().tables.values(),
        "test:hash",
        lambda m: partition_key_for(partitions_def, m),
    )
    conn.rollback()
    return sum(r.needs_embedding for r in rows)


def test_backlog_counts_missing_and_stale_rows_per_partition(
    small_data, hash_defs, hash_resources, instance, conn, settings, monkeypatch, capsys
):
    everything = tuple(spec.asset_name for spec in settings.tables.values())
    assert materialize_all(hash_defs, hash_resources, instance, names=everything).success
    CALLS.clear()
    legacy = insert_messages(
        conn,
        [datetime(2024, 2, 1, tzinfo=UTC)] * 3 + [datetime(2024, 3, 9, tzinfo=UTC)] * 2,
        chat_id=900,
    )
    conn.execute(
        "UPDATE messages SET content = content || ' (typo fixed)' WHERE id = "
        "(SELECT min(id) FROM messages WHERE chat_id = 4242)"
    )
    conn.commit()
    partitions_def = monthly_partitions(settings.partition_start)
    rows = backlog(
        conn, settings.tables.values(), "test:hash", lambda m: partition_key_for(partitions_def, m)
    )
    pending = {(r.table, r.partition): (r.missing, r.stale) for r in rows if r.needs_embedding}
    assert pending == {
        ("messages", "2024-02-01"): (3, 0),
        ("messages", "2024-03-01"): (2, 0),
        ("messages", "2025-09-01"): (0, 1),
    }
    assert partition_range(rows) == ("2024-02-01", "2025-09-01")

    # what the backlog sensor observes of `messages`: the pending rows alone, read through
    # the pending index (no month row count)
    source = table_pending(
        conn,
        settings.tables["messages"],
        "test:hash",
        lambda m: partition_key_for(partitions_def, m),
    )
    conn.rollback()
    assert sum(r.needs_embedding for r in source) == 6
    assert "| messages | 2024-02-01 |  | 3 | 0 |" in render_markdown(source)

    from embedding_pipeline import cli
    from embedding_pipeline.cli import runs

    monkeypatch.setenv("DATABASE_URL", settings.effective_database_url)
    monkeypatch.setenv("DAGSTER_HOME", str(Path(instance.root_directory)))
    monkeypatch.setattr(runs, "build_embedder", lambda s: helpers.HashEmbedder())
    capsys.readouterr()
    assert cli.main(["backlog", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(r["partition"], r["missing"], r["stale"]) for r in listed} == {
        ("2024-02-01", 3, 0),
        ("2024-03-01", 2, 0),
        ("2025-09-01", 0, 1),
    }
    assert cli.main(["backlog"]) == 0
    text = capsys.readouterr().out
    assert "6 rows need embedding in 3 partition(s)" in text
    assert "dg launch --assets message_embeddings --partition-range 2024-02-01...2025-09-01" in text

    result = materialize_all(hash_defs, hash_resources, instance)
    assert materialization_metadata(result)[MESSAGES]["run_rows_embedded"] == 6
    assert len(embedded_texts()) == 6
    assert runs_pending(conn) == 0
    conn.execute("DELETE FROM messages WHERE id = ANY(%s)", (legacy,))
    conn.commit()


def test_a_failing_embedder_keeps_committed_batches_and_the_rerun_does_the_rest(
    small_data, hash_defs, hash_resources, instance, conn
):
    ids = insert_messages(conn, [datetime(2024, 6, 1, tzinfo=UTC)] * 18, chat_id=901)
    failing = {**hash_resources, "embedder": HashEmbedderResource(batch_size=4, fail_after_calls=2)}
    result = dg.materialize(
        [hash_defs.get_assets_def(MESSAGES)],
        resources=failing,
        instance=instance,
        partition_key="2024-06-01",
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "provider down after 2 calls" in str(failure.step_failure_data.error)
    done = conn.execute(
        "SELECT count(*) FROM messages WHERE id = ANY(%s) AND embedding IS NOT NULL", (ids,)
    ).fetchone()[0]
    assert done == 8
    first_texts = set(embedded_texts())
    CALLS.clear()
    rerun = dg.materialize(
        [hash_defs.get_assets_def(MESSAGES)],
        resources=hash_resources,
        instance=instance,
        partition_key="2024-06-01",
    )
    assert materialization_metadata(rerun)[MESSAGES]["run_rows_embedded"] == 10
    assert len(embedded_texts()) == 10
    assert not first_texts & set(embedded_texts())
    assert (
        conn.execute(
            "SELECT count(*) FROM messages WHERE id = ANY(%s) AND embedding IS NULL", (ids,)
        ).fetchone()[0]
        == 0
    )
    conn.rollback()


def _worker(settings: Settings, log: Path, *options: str) -> subprocess.Popen[bytes]:
    """A run of message embeddings for July 2024 in another process, with a HashEmbedder
    that logs every text it is sent to `log`."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedding_pipeline_tests.support.incremental",
            "materialize",
            "--database-url",
            settings.effective_database_url,
            "--start",
            "2024-07-01",
            "--end",
            "2024-07-01",
            "--log",
            str(log),
            *options,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


def _kill_after(
    worker: subprocess.Popen[bytes], conn: psycopg.Connection, ids: list[int], rows: int
) -> int:
    """SIGKILL `worker` once `rows` of `ids` are embedded; the rows embedded then."""

    def done() -> int:
        row = conn.execute(
            "SELECT count(*) FROM messages WHERE id = ANY(%s) AND embedding IS NOT NULL", (ids,)
        ).fetchone()
        conn.rollback()
        return int(row[0])

    try:
        deadline = time.monotonic() + 120
        while done() < rows:
            assert worker.poll() is None, worker.communicate()
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    deadline = time.monotonic() + 30
    while advisory_locks(conn):
        assert time.monotonic() < deadline, "the killed run's session kept its locks"
        time.sleep(0.1)
    return done()


def test_a_sigkilled_run_keeps_its_committed_batches(
    small_data, hash_defs, hash_resources, instance, conn, settings, tmp_path
):
    ids = insert_messages(conn, [datetime(2024, 7, 3, tzinfo=UTC)] * 40, chat_id=902)
    log = tmp_path / "calls.jsonl"
    worker = _worker(settings, log, "--batch-size", "4", "--delay", "0.4")
    committed = _kill_after(worker, conn, ids, 12)
    assert 12 <= committed < 40
    killed_texts = [t for texts in helpers.logged_texts(log).values() for t in texts]
    assert committed <= len(killed_texts) <= committed + 4

    rerun = dg.materialize(
        [hash_defs.get_assets_def(MESSAGES)],
        resources=hash_resources,
        instance=instance,
        partition_key="2024-07-01",
    )
    assert materialization_metadata(rerun)[MESSAGES]["run_rows_embedded"] == 40 - committed
    assert len(embedded_texts()) == 40 - committed
    embedded = conn.execute(
        "SELECT count(*) FROM messages WHERE id = ANY(%s) AND embedding IS NOT NULL", (ids,)
    ).fetchone()
    assert embedded == (40,)
    conn.rollback()
    assert advisory_locks(conn) == 0


def test_a_crash_while_writers_lag_re_sends_at_most_the_unwritten_bound(
    small_data, hash_defs, hash_resources, instance, conn, settings, tmp_path
):
    """The provider answers at once while every write is slow (a trigger sleeps 10 ms per
    row): without a bound, finished requests would queue for the writers by the hundred
    and a crash would send them all again. With 4 requests in flight and 2 writers, a
    SIGKILL re-sends at most (4 + 2) requests of 4 rows."""
    ids = insert_messages(conn, [datetime(2024, 7, 9, tzinfo=UTC)] * 400, chat_id=903)
    conn.execute("""
        CREATE FUNCTION ep_test_slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.embedding IS DISTINCT FROM OLD.embedding THEN
                PERFORM pg_sleep(0.01);
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER ep_test_slow_write BEFORE UPDATE ON messages
        FOR EACH ROW EXECUTE FUNCTION ep_test_slow_write();
    """)
    conn.commit()
    log = tmp_path / "calls.jsonl"
    try:
        worker = _worker(
            settings,
            log,
            *("--batch-size", "4", "--concurrency", "4", "--write-connections", "2"),
            *("--claim-size", "0"),  # the default claim: hundreds of rows at once
        )
        committed = _kill_after(worker, conn, ids, 60)
    finally:
        conn.execute("DROP TRIGGER ep_test_slow_write ON messages")
        conn.execute("DROP FUNCTION ep_test_slow_write()")
        conn.execute("DELETE FROM messages WHERE id = ANY(%s)", (ids,))  # the next tests'
        conn.commit()
    sent = [t for texts in helpers.logged_texts(log).values() for t in texts]
    assert 60 <= committed < 400
    assert len(set(sent)) == len(sent) and all(" 903-" in t for t in sent)
    assert committed <= len(sent) <= committed + (4 + 2) * 4, (len(sent), committed)


def advisory_locks(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchone()
    conn.rollback()
    return int(row[0])


def test_a_model_change_reembeds_every_row_in_place(
    small_data, hash_defs, instance, conn, settings
):
    """Requirement 2's third case (vectors of another model). In place, without a switch:
    `test_model_switch.py` covers the shadow-column procedure that avoids mixing."""
    v2 = {
        "postgres": PostgresResource(database_url=settings.effective_database_url),
        "embedder": HashEmbedderResource(batch_size=4, model_tag="test:hash-v2"),
    }
    total = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    conn.rollback()
    result = materialize_all(hash_defs, v2, instance)
    meta = materialization_metadata(result)[MESSAGES]
    assert meta["run_rows_embedded"] == total
    assert meta["stale_model_at_start"] == total
    assert len(embedded_texts()) == total
    models = conn.execute("SELECT DISTINCT embedding_model FROM messages").fetchall()
    assert models == [("test:hash-v2",)]
    CALLS.clear()
    assert materialize_all(hash_defs, hash_resources_for(settings), instance).success
    assert len(embedded_texts()) == total


def hash_resources_for(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    return {
        "postgres": PostgresResource(database_url=settings.effective_database_url),
        "embedder": HashEmbedderResource(batch_size=4),
    }


def test_a_deleted_message_leaves_no_vector_behind(small_data, conn, settings):
    row = conn.execute(
        "SELECT m.id, m.embedding, m.embedding_model FROM messages m "
        "JOIN atoms_messages l ON l.message_id = m.id "
        "WHERE m.embedding IS NOT NULL ORDER BY m.id LIMIT 1"
    ).fetchone()
    message_id, vector, model_id = row
    conn.execute("DELETE FROM messages WHERE id = %s", (message_id,))
    conn.commit()
    assert (
        conn.execute(
            "SELECT count(*) FROM atoms_messages WHERE message_id = %s", (message_id,)
        ).fetchone()[0]
        == 0
    )
    searcher = Searcher(settings, embedder=helpers.HashEmbedder(model_id=model_id))
    engine = engine_for(settings.effective_database_url)
    with engine.connect() as search_conn:
        hits = searcher.search(search_conn, "a deleted message", k=50, vector=vector.to_numpy())
    engine.dispose()
    assert hits
    assert message_id not in {h.id for h in hits}
    vector_columns = conn.execute(
        "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE a.atttypid = 'vector'::regtype AND NOT a.attisdropped AND c.relkind = 'r' "
        "AND n.nspname NOT LIKE 'pg_temp%' ORDER BY 1"
    ).fetchall()
    conn.rollback()
    assert vector_columns == [
        ("atoms", "embedding"),
        ("messages", "embedding"),
        ("topics", "embedding"),
    ]


def test_a_large_load_builds_the_index_after_and_small_ones_keep_it(fresh_database_url, instance):
    settings = replace(
        Settings(database_url=fresh_database_url),
        hnsw=HnswSettings(bulk_load_min_rows=30, rebuild_fraction=0.5),
    )
    resources = hash_resources_for(settings)
    defs = build_definitions(settings, resources)
    with db.connection(fresh_database_url, vector=False) as conn:
        ensure_schema(conn, settings, 384)
        index = hnsw_index_name(settings.tables["messages"])
        assert index_state(conn, index) == "valid"
        insert_messages(conn, [datetime(2025, 1, 5, tzinfo=UTC)] * 40, chat_id=5)
    first = dg.materialize(
        [defs.get_assets_def(MESSAGES)],
        resources=resources,
        instance=instance,
        partition_key="2025-01-01",
    )
    meta = materialization_metadata(first)[MESSAGES]
    assert meta["index_strategy"] == "built after load"
    assert meta["run_rows_embedded"] == 40
    with db.connection(fresh_database_url, vector=False) as conn:
        assert index_state(conn, index) == "valid"
        insert_messages(conn, [datetime(2025, 1, 6, tzinfo=UTC)] * 35, chat_id=6)
    second = dg.materialize(
        [defs.get_assets_def(MESSAGES)],
        resources=resources,
        instance=instance,
        partition_key="2025-01-01",
    )
    assert materialization_metadata(second)[MESSAGES]["index_strategy"] == "incremental"
    with db.connection(fresh_database_url, vector=False, autocommit=True) as conn:
        assert index_state(conn, index) == "valid"
        spec = settings.tables["messages"]
        conn.execute(f"DROP INDEX {index}")
        with db.connection(fresh_database_url, vector=False) as loader:
            loader.execute("SELECT pg_advisory_lock(%s)", (bulk_load_lock_key(spec),))
            ensure_schema(conn, settings, 384)
            assert index_state(conn, index) is None, "built while a bulk load holds the column"
        ensure_schema(conn, settings, 384)
        assert index_state(conn, index) is None, "75 vectors: left to the run, concurrently"
    third = dg.materialize(
        [defs.get_assets_def(MESSAGES)],
        resources=resources,
        instance=instance,
        partition_key="2025-01-01",
    )
    meta = materialization_metadata(third)[MESSAGES]
    assert meta["run_rows_embedded"] == 0 and meta["index_strategy"] == "built after load"
    with db.connection(fresh_database_url, vector=False) as conn:
        assert index_state(conn, index) == "valid"


def test_nulls_set_in_sql_are_cleared_by_a_cli_backfill(fresh_database_url, tmp_path):
    """The operator's path: `dg launch --partition-range` from the project folder, real
    local model, recorded on a Dagster instance."""
    ingest_small_chat(Settings(database_url=fresh_database_url))
    with db.connection(fresh_database_url) as conn:
        conn.execute("UPDATE messages SET embedding = NULL")
        conn.commit()
        assert null_count(conn) == 4 + 2 + 3
    home, user_home = tmp_path / "dagster_home", tmp_path / "home"
    home.mkdir()
    user_home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **os.environ,
        "DATABASE_URL": fresh_database_url,
        "DAGSTER_HOME": str(home),
        "HOME": str(user_home),
        "TOKENIZERS_PARALLELISM": "false",
    }
    launched = subprocess.run(
        [
            str(VENV_BIN / "dg"),
            "launch",
            "--assets",
            "message_embeddings,topic_embeddings,atom_embeddings",
            "--partition-range",
            "2025-09-01...2025-10-01",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    said = launched.stdout + launched.stderr
    assert "Telemetry" not in said and "virtual environment" not in said
    assert not (user_home / ".dagster").exists(), "dg wrote to ~/.dagster"
    with db.connection(fresh_database_url) as conn:
        assert null_count(conn) == 0
    with dg.DagsterInstance.from_config(str(home)) as recorded:
        runs = recorded.get_runs()
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.SUCCESS
        assert runs[0].tags["dagster/asset_partition_range_start"] == "2025-09-01"


@pytest.mark.parametrize(
    ("pending", "indexed", "wanted"),
    [
        (1_999, 0, False),  # too few rows to be worth a drop
        (2_000, 0, True),  # a first load: nothing to lose
        (30_000, 70_000, True),  # 30% of the final index: one build beats 30,000 inserts
        (29_000, 71_000, False),
        (200_000, 250_000, False),  # a large index stays: search must not fall back to scans
    ],
)
def test_a_load_builds_after_when_that_is_cheaper(pending, indexed, wanted):
    assert bulk_load_wanted(pending, indexed, HnswSettings()) is wanted
