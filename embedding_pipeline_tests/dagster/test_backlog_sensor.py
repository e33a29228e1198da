"""The backlog sensor, evaluated with `dg.build_sensor_context` on a real instance and
database: drift of every kind (a vector set to NULL, text edited in SQL, a row failed and
due again, a dropped HNSW index) requests runs of the table's named job for exactly the
months with work; queued runs are not piled on; the UI reports (month observations, the
lag check, the source tables' backlog) are sent when something changed and only then.

The tests are consecutive ticks of one scenario carrying the cursor, as the daemon does:
run the module, not one test alone. The daemon and real runs are exercised end to end by
`test_ui.py`."""

from __future__ import annotations

import uuid

import dagster as dg
import pytest

from embedding_pipeline.checks import LAG, PER_RUN_CHECKS
from embedding_pipeline.jobs import PARTITIONS_TAG, TABLES_TAG, TRIGGER_TAG
from embedding_pipeline.lib.embedders import LOCAL_MODEL_ID
from embedding_pipeline.sensors import BACKLOG_SENSOR
from embedding_pipeline.sensors.backlog import REASON_TAG
from embedding_pipeline_tests.support.runs import embed_months

SEPTEMBER = "2025-09-01"
OCTOBER = "2025-10-01"


@pytest.fixture(scope="module")
def state():
    return {"cursor": None}


@pytest.fixture(scope="module")
def embedded(small_data, defs, instance):
    embed_months(defs, instance, *(spec.asset_name for spec in small_data.tables.values()))
    return small_data


def tick(defs, instance, state, *, keep_cursor: bool = False) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def(BACKLOG_SENSOR)
    with dg.build_sensor_context(
        instance=instance, cursor=state["cursor"], definitions=defs, resources=defs.resources
    ) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    if not keep_cursor:
        state["cursor"] = result.cursor
    return result


def requests(result: dg.SensorResult) -> dict[str, dg.RunRequest]:
    return {r.job_name or "": r for r in result.run_requests or []}


def observations(result: dg.SensorResult) -> dict[tuple[str, str | None], dict[str, object]]:
    """The embedding assets' month observations."""
    return {
        (e.asset_key.to_user_string(), e.partition): {k: v.value for k, v in e.metadata.items()}
        for e in result.asset_events
        if isinstance(e, dg.AssetObservation) and e.partition is not None
    }


def lag_reports(result: dg.SensorResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {
        e.asset_key.to_user_string(): e
        for e in result.asset_events
        if isinstance(e, dg.AssetCheckEvaluation) and e.check_name == LAG
    }


def source_reports(result: dg.SensorResult) -> dict[str, dict[str, object]]:
    """The observations of the source tables (external assets: never materialized)."""
    assert not [e for e in result.asset_events if isinstance(e, dg.AssetMaterialization)]
    return {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.metadata.items()}
        for e in result.asset_events
        if isinstance(e, dg.AssetObservation) and e.partition is None
    }


def test_sensor_runs_by_default_with_the_configured_interval(defs):
    sensor = defs.resolve_sensor_def(BACKLOG_SENSOR)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 10
    assert {job.name for job in sensor.jobs} >= {"embed_messages", "embed_topics", "embed_atoms"}


def test_a_current_database_launches_nothing_and_reports_once(embedded, defs, instance, state):
    first = tick(defs, instance, state)
    assert not first.run_requests
    assert first.skip_reason is not None
    assert "every row has a current embedding" in first.skip_reason.skip_message
    assert observations(first) == {}
    assert {k: e.passed for k, e in lag_reports(first).items()} == {
        "message_embeddings": True,
        "topic_embeddings": True,
        "atom_embeddings": True,
    }
    assert {k: m["rows_needing_embedding"] for k, m in source_reports(first).items()} == {
        "messages": 0,
        "topics": 0,
        "atoms": 0,
    }
    again = tick(defs, instance, state)
    assert not again.run_requests and again.asset_events == []


def test_nulled_and_edited_rows_launch_the_tables_jobs_for_their_months(
    embedded, defs, instance, state, conn
):
    september, october = conn.execute(
        "SELECT min(id) FROM messages WHERE sent_at < '2025-10-01' UNION ALL "
        "SELECT min(id) FROM messages WHERE sent_at >= '2025-10-01'"
    ).fetchall()
    conn.execute("UPDATE messages SET embedding = NULL WHERE id = %s", september)
    conn.execute("UPDATE messages SET content = content || ' (edited)' WHERE id = %s", october)
    conn.execute(
        "UPDATE atoms SET title = title || ' (edited)' WHERE id = (SELECT min(id) FROM atoms)"
    )
    conn.commit()
    atom_month = conn.execute(
        "SELECT to_char(date_trunc('month', created_at, 'UTC'), 'YYYY-MM-DD') FROM atoms "
        "WHERE id = (SELECT min(id) FROM atoms)"
    ).fetchone()[0]

    state["cursor_before"] = state["cursor"]
    result = tick(defs, instance, state)
    runs = requests(result)
    assert set(runs) == {"embed_messages", "embed_atoms"}
    messages = runs["embed_messages"]
    assert messages.tags["dagster/asset_partition_range_start"] == SEPTEMBER
    assert messages.tags["dagster/asset_partition_range_end"] == OCTOBER
    assert messages.tags[TRIGGER_TAG] == "backlog"
    assert messages.tags[TABLES_TAG] == "messages"
    assert messages.tags[PARTITIONS_TAG] == f"{SEPTEMBER},{OCTOBER}"
    assert messages.tags[REASON_TAG] == "1 missing, 1 stale"
    assert {k.name for k in messages.asset_check_keys or []} == set(PER_RUN_CHECKS)
    assert runs["embed_atoms"].partition_key == atom_month
    assert [k.to_user_string() for k in runs["embed_atoms"].asset_selection or []] == [
        "atom_embeddings"
    ]

    seen = observations(result)
    assert seen[("message_embeddings", SEPTEMBER)]["backlog_missing"] == 1
    assert seen[("message_embeddings", OCTOBER)]["backlog_stale"] == 1
    assert seen[("atom_embeddings", atom_month)]["backlog_stale"] == 1
    assert len(seen) == 3
    assert set(lag_reports(result)) == {"message_embeddings", "atom_embeddings"}
    assert lag_reports(result)["message_embeddings"].metadata["pending_rows"].value == 2
    assert source_reports(result)["messages"]["rows_needing_embedding"] == 2
    assert "| messages | 2025-09-01 |" in str(source_reports(result)["messages"]["backlog"])

    state["request"] = messages


def test_a_tick_evaluated_again_requests_the_same_run_keys(embedded, defs, instance, state):
    after = state["cursor"]
    state["cursor"] = state["cursor_before"]
    again = tick(defs, instance, state, keep_cursor=True)
    assert requests(again)["embed_messages"].run_key == state["request"].run_key
    state["cursor"] = after


def test_a_running_run_over_the_same_months_is_not_piled_on(embedded, defs, instance, state):
    run = dg.DagsterRun(
        job_name="embed_messages",
        run_id=str(uuid.uuid4()),
        status=dg.DagsterRunStatus.STARTED,
        tags={"dagster/partition": OCTOBER},
    )
    instance.add_run(run)
    try:
        result = tick(defs, instance, state)
        assert set(requests(result)) == {"embed_atoms"}
        assert observations(result) == {}, "nothing changed in the rows"
    finally:
        instance.delete_run(run.run_id)


def test_after_the_repair_each_month_is_reported_back_to_zero(
    embedded, defs, instance, state, conn
):
    embed_months(defs, instance, "message_embeddings", "atom_embeddings")
    after = tick(defs, instance, state)
    assert not after.run_requests
    seen = observations(after)
    assert len(seen) == 3
    assert all(o["backlog_needs_embedding"] == 0 for o in seen.values())
    assert all(e.passed for e in lag_reports(after).values())


def test_failed_rows_wait_for_their_time_then_launch_a_run(embedded, defs, instance, state, conn):
    row_id, source_hash = conn.execute(
        "SELECT id, embedding_source_hash FROM messages WHERE sent_at < '2025-10-01' "
        "ORDER BY id LIMIT 1"
    ).fetchone()
    conn.execute("UPDATE messages SET embedding = NULL WHERE id = %s", (row_id,))
    conn.execute(
        "INSERT INTO embedding_errors (table_name, column_name, row_id, source_hash, model_id, "
        "error_class, message, next_attempt_at) VALUES ('messages', 'embedding', %s, %s, %s, "
        "'input_rejected', 'refused', now() + interval '1 hour')",
        (row_id, source_hash, LOCAL_MODEL_ID),
    )
    conn.commit()
    waiting = tick(defs, instance, state)
    assert not waiting.run_requests
    assert observations(waiting)[("message_embeddings", SEPTEMBER)]["backlog_failed"] == 1

    conn.execute("UPDATE embedding_errors SET next_attempt_at = now() - interval '1 second'")
    conn.commit()
    due = tick(defs, instance, state)
    assert requests(due)["embed_messages"].partition_key == SEPTEMBER
    conn.execute("DELETE FROM embedding_errors")
    conn.commit()


def test_a_missing_hnsw_index_launches_a_run_that_builds_it(embedded, defs, instance, state, conn):
    conn.execute("DROP INDEX topics_embedding_hnsw_idx")
    conn.commit()
    result = tick(defs, instance, state)
    topics = requests(result)["embed_topics"]
    assert topics.tags[REASON_TAG] == "HNSW index missing"
    run = dg.materialize(
        [defs.get_assets_def("topic_embeddings")],
        resources=defs.resources,
        instance=instance,
        partition_key=topics.partition_key,
    )
    assert run.success
    assert conn.execute(
        "SELECT count(*) FROM pg_indexes WHERE indexname = 'topics_embedding_hnsw_idx'"
    ).fetchone() == (1,)


def test_a_table_whose_latest_run_just_failed_waits_before_another_is_launched(
    embedded, defs, instance, state, conn
):
    """Ticking every few seconds, the sensor must not relaunch a run that fails at once (a
    refused key, a wrong dimension) at every tick: after the table's latest embedding run
    failed (its retries are later runs), it waits EP_BACKLOG_FAILURE_BACKOFF_SECONDS and
    says so; the other tables are not held up."""
    conn.execute("UPDATE messages SET embedding = NULL WHERE id = (SELECT min(id) FROM messages)")
    conn.commit()
    failed = dg.DagsterRun(
        job_name="embed_messages", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED
    )
    instance.add_run(failed)
    instance.report_run_failed(failed)
    try:
        waiting = tick(defs, instance, state)
        assert "embed_messages" not in requests(waiting)
        assert f"run {failed.run_id[:8]} failed less than 300 s ago" in str(waiting.skip_reason)
    finally:
        instance.delete_run(failed.run_id)
    assert "embed_messages" in requests(tick(defs, instance, state))


def test_backlog_interval_comes_from_the_environment():
    from embedding_pipeline.settings import load_settings

    assert (
        load_settings({"EP_BACKLOG_SENSOR_INTERVAL_SECONDS": "10"}).sensor.backlog_interval_seconds
        == 10
    )
    with pytest.raises(ValueError, match="EP_BACKLOG_SENSOR_INTERVAL_SECONDS"):
        load_settings({"EP_BACKLOG_SENSOR_INTERVAL_SECONDS": "0"})
    backoff = load_settings({"EP_BACKLOG_FAILURE_BACKOFF_SECONDS": "0"})
    assert backoff.sensor.backlog_failure_backoff_seconds == 0
    with pytest.raises(ValueError, match="EP_BACKLOG_FAILURE_BACKOFF_SECONDS"):
        load_settings({"EP_BACKLOG_FAILURE_BACKOFF_SECONDS": "-1"})
    assert load_settings({"EP_FRESHNESS_WARN_MINUTES": "5"}).checks.freshness_warn_minutes == 5
