"""A provider down for a while, then back: the real `dagster-daemon` runs the extraction
sensor against the test database and a provider (the fault server) that answers 503; the
sensor's run fails once its requests pass the retry deadline, the daemon retries it as the
project-local instance config says (`cli.LOCAL_INSTANCE_CONFIG`), and the retry, with the
provider back, embeds every row. Nobody acts in between."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.scheduler.instigation import InstigatorType

from embedding_pipeline.lib.engine.claims import lock_namespace
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.pgserver import EmbeddedPostgres
from embedding_pipeline.sensors import SENSOR_NAME
from embedding_pipeline.settings import Settings
from embedding_pipeline.testing.fault_server import FaultServer
from embedding_pipeline_tests.support.daemon import (
    instance_home,
    project_env,
    running_daemon,
    wait_for,
    workspace,
)
from embedding_pipeline_tests.support.database import create_database
from embedding_pipeline_tests.support.faults import OPENAI_ID, assert_embedded, schema_for
from embedding_pipeline_tests.support.incremental import add_extraction, insert_messages


@pytest.fixture
def daemon_home(tmp_path: Path) -> Path:
    return instance_home(tmp_path)


@pytest.fixture
def daemon(
    pg_server: EmbeddedPostgres, fault_server: FaultServer, daemon_home: Path, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    """`dagster-daemon run` on a workspace loading this project with the test database and
    the fault server as OpenAI; yields (database URL, log file)."""
    url = create_database(pg_server, "run_retries")
    schema_for(url)
    env = project_env(
        daemon_home,
        url,
        fault_server,
        {"EP_RETRY_DEADLINE_SECONDS": "2", "EP_SENSOR_INTERVAL_SECONDS": "1"},
    )
    log = tmp_path / "daemon.log"
    with running_daemon(workspace(tmp_path), env, log):
        yield url, log


def test_a_sensor_run_failed_by_a_provider_outage_is_retried_until_every_row_is_embedded(
    daemon: tuple[str, Path], daemon_home: Path, fault_server: FaultServer
) -> None:
    url, log = daemon
    fault_server.down()  # 503 for every request until up()
    with dg.DagsterInstance.from_config(str(daemon_home)) as instance:

        def sensor_started() -> bool | None:
            states = instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
            started = any(
                s.instigator_name == SENSOR_NAME and s.instigator_data.cursor  # type: ignore[union-attr]
                for s in states
            )
            return True if started else None

        wait_for("the sensor's first tick", sensor_started, 120, log)
        with db.connection(url) as conn:
            extraction = add_extraction(conn, "outage")
            start = datetime(2025, 3, 1, tzinfo=UTC)
            ids = insert_messages(
                conn,
                [start + timedelta(hours=i) for i in range(12)],
                extraction_id=extraction,
                prefix="outage",
            )

        def runs(status: dg.DagsterRunStatus) -> list[dg.DagsterRun] | None:
            found = instance.get_runs(
                filters=dg.RunsFilter(statuses=[status], tags={"dagster/sensor_name": SENSOR_NAME})
            )
            return list(found) or None

        [failed] = wait_for(
            "the sensor's run to fail", lambda: runs(dg.DagsterRunStatus.FAILURE), 120, log
        )
        assert fault_server.snapshot().outcomes["503"] >= 2  # it retried before it gave up
        fault_server.up()

        [succeeded] = wait_for(
            "the retried run to succeed", lambda: runs(dg.DagsterRunStatus.SUCCESS), 120, log
        )

        assert succeeded.parent_run_id == failed.run_id
        assert succeeded.tags["dagster/retry_number"] == "1"
        assert succeeded.tags["dagster/partition"] == "2025-03-01"
        # the retry re-executes every step (the embedding and the step of all nine checks),
        # not only the failed one: a retry that re-ran only a failed check would embed nothing
        assert failed.tags["dagster/retry_strategy"] == "ALL_STEPS"
        started = {
            r.event_log_entry.step_key
            for r in instance.get_records_for_run(
                succeeded.run_id, of_type=dg.DagsterEventType.STEP_START
            ).records
        }
        assert started == {"message_embeddings", "message_embeddings_checks"}
        evaluated = instance.get_records_for_run(
            succeeded.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ).records
        assert len(evaluated) == 9
        failure = instance.get_records_for_run(
            failed.run_id, of_type=dg.DagsterEventType.STEP_FAILURE
        ).records
        [event] = [r.event_log_entry.dagster_event for r in failure]
        assert event is not None
        reason = event.step_failure_data.user_failure_data
        assert reason is not None and "HTTP 503" in (reason.description or "")
        assert "EP_RETRY_DEADLINE_SECONDS" in (reason.description or "")
    assert_embedded(Settings(database_url=url), ids, OPENAI_ID)
    assert fault_server.snapshot().answered_more_than_once() == []


def test_a_run_that_failed_only_on_a_check_is_retried_with_its_embedding(
    daemon: tuple[str, Path], daemon_home: Path, fault_server: FaultServer
) -> None:
    """Another session (not a run) keeps one new row locked while the sensor's run goes
    by: the run skips it, and its blocking `no_missing_embeddings` fails the run on that
    row, which the run owed. Once the lock is gone, the daemon's retry embeds the row:
    every step runs again (`dagster/retry_strategy: ALL_STEPS`). Re-running only the
    failed check would end green with the row still missing."""
    url, log = daemon
    spec = Settings(database_url=url).tables["messages"]
    with dg.DagsterInstance.from_config(str(daemon_home)) as instance:
        wait_for(
            "the sensor's first tick",
            lambda: (
                True
                if any(
                    s.instigator_name == SENSOR_NAME and s.instigator_data.cursor  # type: ignore[union-attr]
                    for s in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
                )
                else None
            ),
            120,
            log,
        )
        with db.connection(url) as conn, db.connection(url, autocommit=True) as holder:
            extraction = add_extraction(conn, "held row")
            conn.commit()
            ids = insert_messages(
                conn,
                [datetime(2025, 5, 1, tzinfo=UTC) + timedelta(hours=i) for i in range(6)],
                extraction_id=extraction,
                prefix="held",
            )
            held = ids[2]
            holder.execute("SELECT pg_advisory_lock(%s)", [(lock_namespace(spec) << 32) + held])

            def runs(status: dg.DagsterRunStatus) -> list[dg.DagsterRun] | None:
                found = instance.get_runs(
                    filters=dg.RunsFilter(
                        statuses=[status], tags={"dagster/sensor_name": SENSOR_NAME}
                    )
                )
                return list(found) or None

            [failed] = wait_for(
                "the run to fail on its check", lambda: runs(dg.DagsterRunStatus.FAILURE), 120, log
            )
            holder.execute("SELECT pg_advisory_unlock_all()")
        failures = instance.get_records_for_run(
            failed.run_id, of_type=dg.DagsterEventType.STEP_FAILURE
        ).records
        # the checks' step fails on its blocking check, once every check has its result
        assert {r.event_log_entry.step_key for r in failures} == {"message_embeddings_checks"}
        [failure] = [r.event_log_entry.dagster_event for r in failures]
        assert failure is not None and failure.step_failure_data.error is not None
        assert (
            "message_embeddings: no_missing_embeddings" in failure.step_failure_data.error.message
        )
        assert (
            len(
                instance.get_records_for_run(
                    failed.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
                ).records
            )
            == 9
        )
        [succeeded] = wait_for(
            "the retried run to succeed", lambda: runs(dg.DagsterRunStatus.SUCCESS), 120, log
        )
        assert succeeded.parent_run_id == failed.run_id
    assert_embedded(Settings(database_url=url), ids, OPENAI_ID)
