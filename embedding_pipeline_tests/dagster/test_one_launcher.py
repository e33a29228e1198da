"""The two sensors share one view of the work in flight: an ingest becomes at most one run
per table, whichever sensor sees it first, and no run is requested that would embed
nothing. Both sensors are evaluated with `dg.build_sensor_context` on a real instance and
database; the runs one sensor requests are recorded on the instance as queued, as the
daemon records them before it evaluates the next sensor."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import dagster as dg
import psycopg
import pytest

from embedding_pipeline.lib.sources.extractions import ExtractionCursor
from embedding_pipeline.sensors import BACKLOG_SENSOR, SENSOR_NAME
from embedding_pipeline.settings import Settings
from embedding_pipeline_tests.support.incremental import add_extraction, insert_messages
from embedding_pipeline_tests.support.runs import embed_months

ASSETS = ("message_embeddings", "topic_embeddings", "atom_embeddings")


@pytest.fixture
def embedded(small_data: Settings, defs: dg.Definitions) -> Settings:
    """Everything embedded (on an instance of its own: no run of other tests)."""
    with dg.instance_for_test() as instance:
        embed_months(defs, instance, *ASSETS)
    return small_data


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, name: str, cursor: str | None):
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, resources=defs.resources
    ) as context:
        result = defs.resolve_sensor_def(name)(context)
    assert isinstance(result, dg.SensorResult)
    return result


def queue(instance: dg.DagsterInstance, result: dg.SensorResult) -> list[str]:
    """Record each requested run as queued, as the daemon does; the requested jobs."""
    jobs = []
    for request in result.run_requests or []:
        instance.add_run(
            dg.DagsterRun(
                job_name=request.job_name or "",
                run_id=str(uuid.uuid4()),
                status=dg.DagsterRunStatus.NOT_STARTED,  # queued, not yet dequeued
                tags=request.tags,
                asset_selection=frozenset(request.asset_selection or []),
            )
        )
        jobs.append(request.job_name or "")
    return jobs


def ingest_update(conn: psycopg.Connection) -> int:
    """An extraction adding messages in October and November 2025 and editing an atom."""
    extraction = add_extraction(conn, "update")
    insert_messages(
        conn,
        [datetime(2025, 10, 20, tzinfo=UTC), datetime(2025, 11, 3, tzinfo=UTC)],
        extraction_id=extraction,
        chat_id=4242,
    )
    conn.execute(
        "UPDATE atoms SET content = content || ' (updated)', extraction_id = %s "
        "WHERE id = (SELECT min(id) FROM atoms)",
        (extraction,),
    )
    conn.commit()
    return extraction


@pytest.mark.parametrize("first", [BACKLOG_SENSOR, SENSOR_NAME])
def test_one_ingest_is_at_most_one_run_per_table_whichever_sensor_looks_first(
    first: str, embedded: Settings, defs: dg.Definitions, conn: psycopg.Connection
) -> None:
    other = SENSOR_NAME if first == BACKLOG_SENSOR else BACKLOG_SENSOR
    with dg.instance_for_test() as instance:
        cursors: dict[str, str | None] = {
            SENSOR_NAME: tick(defs, instance, SENSOR_NAME, None).cursor,
            BACKLOG_SENSOR: None,
        }
        extraction = ingest_update(conn)

        launched = []
        for name in (first, other, first, other):
            result = tick(defs, instance, name, cursors[name])
            cursors[name] = result.cursor
            launched += queue(instance, result)
        assert sorted(launched) == ["embed_atoms", "embed_messages"]
        runs = {r.job_name: r for r in instance.get_runs()}
        assert runs["embed_messages"].tags["embedding_pipeline/partitions"] == (
            "2025-10-01,2025-11-01"
        )
        waiting = tick(defs, instance, other, cursors[other])
        assert not waiting.run_requests
        if other == BACKLOG_SENSOR:
            assert waiting.skip_reason is not None
            assert "waits for run" in (waiting.skip_reason.skip_message or "")
        else:  # the extraction is kept, to be looked at again on the next ticks
            assert extraction in ExtractionCursor.parse(waiting.cursor).gaps
        cursors[other] = waiting.cursor

        # the runs did their work: neither sensor asks for anything more
        embed_months(defs, instance, "message_embeddings", start="2025-10-01", end="2025-11-01")
        embed_months(defs, instance, "atom_embeddings", start="2025-10-01", end="2025-11-01")
        for run in instance.get_runs(
            filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.NOT_STARTED])
        ):
            instance.delete_run(run.run_id)
        for name in (SENSOR_NAME, BACKLOG_SENSOR):
            result = tick(defs, instance, name, cursors[name])
            cursors[name] = result.cursor
            assert not result.run_requests, name
        assert extraction not in ExtractionCursor.parse(cursors[SENSOR_NAME]).gaps
