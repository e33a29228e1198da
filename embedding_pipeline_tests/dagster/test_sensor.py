"""The extraction sensor: evaluated with `dg.build_sensor_context` on a real instance and
database, its query plans on a 100k-row table, and a tick through Dagster's own sensor
daemon code that launches real runs (and, repeated after a simulated crash, none twice).

The `build_sensor_context` tests are consecutive ticks of one scenario: they share the
module's database and carry the cursor from one to the next as the daemon does, so they
run in file order: run the module, not one of them alone."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from embedding_pipeline.checks import PER_RUN_CHECKS
from embedding_pipeline.lib.sources.extraction_file import load_extraction
from embedding_pipeline.lib.sources.extractions import (
    ExtractionCursor,
    months_query,
    new_extractions_query,
    read_new_extractions,
)
from embedding_pipeline.lib.sources.ingest import ingest
from embedding_pipeline.lib.sources.telegram import load_export
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.sensors import EXTRACTIONS_TAG, SENSOR_NAME, run_key_for
from embedding_pipeline.settings import Settings
from embedding_pipeline_tests.support.database import small_export_with_text
from embedding_pipeline_tests.support.incremental import add_extraction, insert_messages
from embedding_pipeline_tests.support.paths import DATA, ROOT

SAMPLE = ROOT / "embedding_pipeline" / "sample_data"


def evaluate(defs: dg.Definitions, resources, instance, cursor: str | None):
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, resources=resources
    ) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def requested(result: dg.SensorResult) -> dict[str, tuple[str, str]]:
    """Embedding asset -> (first, last) month of the one run requested for it."""
    out = {}
    for r in result.run_requests or []:
        [asset] = r.asset_selection or []
        assert r.job_name == f"embed_{asset.to_user_string().split('_')[0]}s"
        first = r.partition_key or r.tags["dagster/asset_partition_range_start"]
        last = r.partition_key or r.tags["dagster/asset_partition_range_end"]
        assert asset.to_user_string() not in out, "one run per table"
        out[asset.to_user_string()] = (first, last)
    return out


@pytest.fixture(scope="module")
def state():
    """The cursor carried from one test to the next, as the daemon carries it."""
    return {"cursor": None}


def test_sensor_is_running_by_default_with_the_configured_interval(defs):
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 5
    from embedding_pipeline.definitions import build_definitions
    from embedding_pipeline.settings import load_settings

    slow = build_definitions(load_settings({"EP_SENSOR_INTERVAL_SECONDS": "30"}))
    assert slow.resolve_sensor_def(SENSOR_NAME).minimum_interval_seconds == 30


def test_no_extractions_table_yet_skips(defs, resources, instance):
    result = evaluate(defs, resources, instance, None)
    assert not result.run_requests
    assert "does not exist yet" in str(result.skip_reason)
    assert ExtractionCursor.parse(result.cursor) == ExtractionCursor(last_id=0)


def test_first_tick_starts_after_the_newest_extraction(schema, defs, resources, instance, state):
    result = evaluate(defs, resources, instance, None)
    assert not result.run_requests
    assert "started: watching extractions after id 0" in str(result.skip_reason)
    assert ExtractionCursor.parse(result.cursor) == ExtractionCursor(last_id=0)
    state["cursor"] = result.cursor


def test_no_new_extraction_skips_with_a_reason(schema, defs, resources, instance, state):
    result = evaluate(defs, resources, instance, state["cursor"])
    assert not result.run_requests
    assert "no new extraction after id 0" in str(result.skip_reason)
    assert result.cursor == state["cursor"]


def test_new_extraction_requests_runs_for_exactly_its_partitions(
    small_data, defs, resources, instance, state, conn
):
    extraction_id = conn.execute("SELECT max(id) FROM extractions").fetchone()[0]
    result = evaluate(defs, resources, instance, state["cursor"])
    assert requested(result) == {
        "message_embeddings": ("2025-09-01", "2025-10-01"),
        "atom_embeddings": ("2025-10-01", "2025-10-01"),
        "topic_embeddings": ("2025-10-01", "2025-10-01"),
    }
    for request in result.run_requests:
        table = request.job_name.removeprefix("embed_")
        months = request.tags["embedding_pipeline/partitions"].split(",")
        assert request.run_key == run_key_for([extraction_id], table, months, state["cursor"])
        assert request.tags[EXTRACTIONS_TAG] == str(extraction_id)
        assert {(k.asset_key, k.name) for k in request.asset_check_keys or []} == {
            (asset, name) for asset in request.asset_selection for name in PER_RUN_CHECKS
        }
    assert ExtractionCursor.parse(result.cursor).last_id == extraction_id

    again = evaluate(defs, resources, instance, state["cursor"])
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in result.run_requests]
    assert again.cursor == result.cursor

    after = evaluate(defs, resources, instance, result.cursor)
    assert not after.run_requests
    assert f"after id {extraction_id}" in str(after.skip_reason)
    state["cursor"] = after.cursor


def test_edit_of_one_message_requests_only_its_partition(
    small_data, defs, resources, instance, state, conn, tmp_path
):
    export = small_export_with_text(tmp_path, 6, "https://status.example.com/incidents/42 (edited)")
    report = ingest(conn, small_data, export, None)
    assert report.messages.updated == 1 and report.messages.created == 0
    result = evaluate(defs, resources, instance, state["cursor"])
    assert requested(result) == {"message_embeddings": ("2025-10-01", "2025-10-01")}
    state["cursor"] = result.cursor


def test_extraction_without_embedded_text_changes_skips_and_advances(
    schema, defs, resources, instance, state, conn
):
    extraction_id = add_extraction(conn, "links only")
    conn.commit()
    result = evaluate(defs, resources, instance, state["cursor"])
    assert not result.run_requests
    assert "changed no embedded text" in str(result.skip_reason)
    assert ExtractionCursor.parse(result.cursor).last_id == extraction_id
    state["cursor"] = result.cursor


def test_rows_outside_the_partition_range_map_to_the_edge_partitions(
    schema, defs, resources, instance, state, conn
):
    extraction_id = add_extraction(conn)
    insert_messages(
        conn,
        [datetime(2019, 5, 1, tzinfo=UTC), datetime(2099, 1, 1, tzinfo=UTC)],
        extraction_id=extraction_id,
        chat_id=501,
    )
    result = evaluate(defs, resources, instance, state["cursor"])
    partitions_def = defs.get_assets_def("message_embeddings").partitions_def
    keys = partitions_def.get_partition_keys()
    assert requested(result) == {"message_embeddings": (keys[0], keys[-1])}
    state["cursor"] = result.cursor


def test_an_extraction_committed_after_a_later_one_is_not_lost(
    schema, defs, resources, instance, state, settings
):
    """Two ingests overlap: the first to start commits last. The cursor keeps the gap."""
    url = settings.effective_database_url
    with db.connection(url) as slow, db.connection(url) as fast:
        slow_id = add_extraction(slow, "slow")
        fast_id = add_extraction(fast, "fast")
        insert_messages(
            fast, [datetime(2025, 3, 5, tzinfo=UTC)], extraction_id=fast_id, chat_id=601
        )
        first = evaluate(defs, resources, instance, state["cursor"])
        assert requested(first) == {"message_embeddings": ("2025-03-01", "2025-03-01")}
        assert slow_id in ExtractionCursor.parse(first.cursor).gaps
        insert_messages(
            slow, [datetime(2025, 4, 5, tzinfo=UTC)], extraction_id=slow_id, chat_id=602
        )
    second = evaluate(defs, resources, instance, first.cursor)
    assert requested(second) == {"message_embeddings": ("2025-04-01", "2025-04-01")}
    assert second.run_requests[0].run_key == run_key_for(
        [slow_id], "messages", ["2025-04-01"], first.cursor
    )
    assert not ExtractionCursor.parse(second.cursor).gaps
    state["cursor"] = second.cursor


def test_gaps_expire_after_the_grace_period(schema, conn):
    cursor = ExtractionCursor(last_id=10, gaps={7: 1000.0, 8: 5000.0})
    new = read_new_extractions(conn, "extractions", cursor, limit=10, now=5100.0, grace_seconds=600)
    assert set(new.cursor.gaps) == {8} | {
        i for i in range(11, new.cursor.last_id) if i not in new.ids
    }
    assert ExtractionCursor.parse(new.cursor.serialize()) == new.cursor
    assert ExtractionCursor.parse("42") == ExtractionCursor(last_id=42)


def _plan(conn: psycopg.Connection, query: sql.Composed, params: dict) -> str:
    rows = conn.execute(sql.SQL("EXPLAIN (COSTS OFF) ") + query, params).fetchall()
    return "\n".join(r[0] for r in rows)


def test_tick_queries_are_index_lookups_on_a_100k_row_table(fresh_database_url):
    """The cost of a tick follows the new extractions, not the table: both statements are
    index scans on a table of 100k messages spread over 1000 extractions."""
    settings = Settings(database_url=fresh_database_url)
    with db.connection(fresh_database_url, vector=False) as conn:
        ensure_schema(conn, settings, 384)
        conn.execute(
            "INSERT INTO extractions (source) SELECT 'bulk ' || g FROM generate_series(1, 1000) g"
        )
        conn.execute("""
            INSERT INTO messages (chat_id, telegram_message_id, sent_at, content, extraction_id)
            SELECT 1, g, timestamptz '2024-01-01' + g * interval '5 minutes',
                   'message number ' || g, 1 + g % 1000
            FROM generate_series(1, 100000) g""")
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE extractions")
        conn.execute("VACUUM ANALYZE messages")
        spec = settings.tables["messages"]
        months = _plan(conn, months_query(spec), {"ids": [998, 999, 1000]})
        extractions = _plan(
            conn, new_extractions_query("extractions"), {"gaps": [5], "after": 995, "limit": 200}
        )
    assert "messages_extraction_id_idx" in months, months
    assert "Seq Scan" not in months, months
    assert "extractions_pkey" in extractions, extractions
    assert "Seq Scan" not in extractions, extractions


def test_daemon_tick_launches_runs_that_embed_exactly_the_new_rows(
    fresh_database_url, monkeypatch, tmp_path
):
    """The real path: Dagster's sensor daemon code evaluates the sensor in the code
    location's gRPC server, creates runs with run keys, and the default run launcher
    executes them in their own processes with the local model. Repeating a tick (the
    cursor put back, as after a daemon crash) launches nothing twice."""
    from dagster._core.scheduler.instigation import (
        InstigatorState,
        SensorInstigatorData,
        TickStatus,
    )
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import ModuleTarget
    from dagster._daemon.sensor import execute_sensor_iteration

    settings = Settings(database_url=fresh_database_url)
    with db.connection(fresh_database_url, vector=False) as conn:
        ensure_schema(conn, settings, 384)
    for name, value in {
        "DATABASE_URL": fresh_database_url,
        "EP_SENSOR_INTERVAL_SECONDS": "1",
        # the backlog sensor ticks once, at the start, and not again: this test is about
        # the extraction sensor's runs (at its 10-second default the backlog sensor could
        # take the edited row first, and the extraction sensor would rightly wait for it)
        "EP_BACKLOG_SENSOR_INTERVAL_SECONDS": "3600",
        "EP_BATCH_SIZE": "64",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(name, value)
    overrides = {
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "DefaultRunCoordinator",
        }
    }
    logger = logging.getLogger("test_sensor_daemon")
    target = ModuleTarget(
        module_name="embedding_pipeline.definitions",
        attribute="defs",
        working_directory=str(ROOT),
        location_name="embedding_pipeline",
    )
    with (
        dg.instance_for_test(overrides=overrides, temp_dir=str(tmp_path)) as instance,
        create_test_daemon_workspace_context(target, instance) as workspace,
    ):

        def tick() -> None:
            time.sleep(1.1)
            list(execute_sensor_iteration(workspace, logger, None, None))

        def sensor_runs() -> list[dg.DagsterRun]:
            return list(
                instance.get_runs(filters=dg.RunsFilter(tags={"dagster/sensor_name": SENSOR_NAME}))
            )

        def wait_for_runs(count: int) -> list[dg.DagsterRun]:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                runs = sensor_runs()
                if len(runs) >= count and all(r.is_finished for r in runs):
                    return runs
                time.sleep(0.5)
            raise AssertionError(f"runs did not finish: {[r.status for r in sensor_runs()]}")

        def embedded_by(runs: list[dg.DagsterRun]) -> int:
            total = 0
            for run in runs:
                for record in instance.get_records_for_run(
                    run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
                ).records:
                    materialization = record.event_log_entry.asset_materialization
                    assert materialization is not None
                    total += int(materialization.metadata["rows_embedded"].value)
            return total

        def null_count() -> int:
            with db.connection(fresh_database_url, vector=False) as conn:
                row = conn.execute(
                    "SELECT (SELECT count(*) FROM messages WHERE embedding IS NULL) + "
                    "(SELECT count(*) FROM topics WHERE embedding IS NULL) + "
                    "(SELECT count(*) FROM atoms WHERE embedding IS NULL)"
                ).fetchone()
            return int(row[0])

        def sensor_state() -> tuple[InstigatorState, SensorInstigatorData]:
            state = next(
                s for s in instance.all_instigator_state() if s.instigator_name == SENSOR_NAME
            )
            assert isinstance(state.instigator_data, SensorInstigatorData)
            return state, state.instigator_data

        tick()
        assert sensor_runs() == []
        state, data = sensor_state()
        assert data.cursor is not None and json.loads(data.cursor)["last_id"] == 0
        cursor_before_ingest = data.cursor
        with db.connection(fresh_database_url) as conn:
            ingest(
                conn,
                settings,
                load_export(DATA / "small_export.json"),
                load_extraction(DATA / "small_extraction.json"),
            )
        tick()
        first_runs = wait_for_runs(3)
        assert {r.job_name: r.tags["embedding_pipeline/partitions"] for r in first_runs} == {
            "embed_messages": "2025-09-01,2025-10-01",
            "embed_topics": "2025-10-01",
            "embed_atoms": "2025-10-01",
        }
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in first_runs)
        assert null_count() == 0
        with db.connection(fresh_database_url, vector=False) as conn:
            total = conn.execute(
                "SELECT (SELECT count(*) FROM messages) + "
                "(SELECT count(*) FROM topics) + "
                "(SELECT count(*) FROM atoms)"
            ).fetchone()[0]
        assert embedded_by(first_runs) == total

        state, data = sensor_state()
        assert data.cursor is not None and json.loads(data.cursor)["last_id"] == 1
        instance.update_instigator_state(
            state.with_data(data._replace(cursor=cursor_before_ingest))
        )
        tick()
        assert len(sensor_runs()) == 3
        ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
        assert ticks[0].status == TickStatus.SKIPPED

        export = small_export_with_text(tmp_path, 2, "The backup is fixed.")
        with db.connection(fresh_database_url) as conn:
            before = conn.execute("SELECT id, embedded_at FROM messages ORDER BY id").fetchall()
            report = ingest(conn, settings, export, None)
        assert report.extraction_id == 2 and report.messages.updated == 1
        tick()
        runs = wait_for_runs(4)
        new_runs = [r for r in runs if r.run_id not in {f.run_id for f in first_runs}]
        assert [r.tags["dagster/partition"] for r in new_runs] == ["2025-09-01"]
        assert new_runs[0].status == dg.DagsterRunStatus.SUCCESS
        assert new_runs[0].tags[EXTRACTIONS_TAG] == "2"
        assert embedded_by(new_runs) == 1
        with db.connection(fresh_database_url) as conn:
            after = conn.execute("SELECT id, embedded_at FROM messages ORDER BY id").fetchall()
        reembedded = [a[0] for a, b in zip(after, before, strict=True) if a[1] != b[1]]
        assert reembedded == [before[0][0]]
        assert null_count() == 0
