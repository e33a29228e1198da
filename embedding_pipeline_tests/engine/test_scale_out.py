"""Scale-out with Dagster's own machinery: two runs of `embed_messages` over the same backlog,
queued with `dagster job launch` and started side by side by the real `dagster-daemon`
(QueuedRunCoordinator, the provider pool allowing two runs), each in its own process.
Both embed part of the backlog, together every row exactly once: the per-row claims
keep them apart, no coordinator of our own is involved.

Both runs end green although each meets the other's work: one loads without the HNSW
index and rebuilds it while the other checks it, and the application edits rows while
they run. The edited rows are the next run's, which embeds their new text."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg

from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.pgserver import EmbeddedPostgres
from embedding_pipeline.settings import Settings
from embedding_pipeline.testing.fault_server import FaultServer
from embedding_pipeline_tests.support.daemon import (
    BIN,
    instance_home,
    project_env,
    running_daemon,
    wait_for,
    workspace,
)
from embedding_pipeline_tests.support.database import create_database
from embedding_pipeline_tests.support.faults import OPENAI_ID, assert_embedded, schema_for
from embedding_pipeline_tests.support.incremental import insert_messages

MONTHS = ("2025-01-01", "2025-03-01")


def test_two_daemon_runs_over_one_backlog_embed_every_row_once(
    pg_server: EmbeddedPostgres, fault_server: FaultServer, tmp_path: Path
) -> None:
    url = create_database(pg_server, "scale_out")
    schema_for(url)
    with db.connection(url) as conn:
        start = datetime(2025, 1, 1, tzinfo=UTC)
        ids = insert_messages(conn, [start + timedelta(hours=9 * i) for i in range(200)])
    # small requests and claims answered in 0.4 s: one run alone would take 8 s, longer
    # than the daemon takes to start the second run's process
    fault_server.configure(latency=0.4)
    home, workspace_file, log = instance_home(tmp_path), workspace(tmp_path), tmp_path / "d.log"
    env = project_env(
        home,
        url,
        fault_server,
        {
            "EP_BATCH_SIZE": "5",
            "EP_CLAIM_SIZE": "10",
            "EP_EMBEDDING_CONCURRENCY": "2",
            # a backlog this size is a bulk load: one run drops the index and rebuilds it
            "EP_HNSW_BULK_LOAD_MIN_ROWS": "50",
        },
    )
    for sensor in ("backlog_sensor", "extraction_sensor"):  # only the two runs embed here
        dagster("sensor", "stop", sensor, "-w", str(workspace_file), env=env)
    tags = {
        "dagster/asset_partition_range_start": MONTHS[0],
        "dagster/asset_partition_range_end": MONTHS[1],
        "embedding_pipeline/trigger": "backfill",
    }
    for _ in range(2):
        launch = ["job", "launch", "-j", "embed_messages", "-w", str(workspace_file)]
        dagster(*launch, "--tags", json.dumps(tags), env=env)

    with running_daemon(workspace_file, env, log), dg.DagsterInstance.from_config(str(home)) as i:

        def finished(count: int) -> list[dg.DagsterRun] | None:
            runs = i.get_runs(filters=dg.RunsFilter(job_name="embed_messages"))
            done = [r for r in runs if r.is_finished]
            return done if len(done) == count else None

        # the application edits 10 rows already embedded and 10 not yet, mid-run
        wait_for("a third of the rows embedded", lambda: _embedded(url, 60), 120, log)
        edited = _edit(url, ids)
        runs = wait_for("both runs to finish", lambda: finished(2), 240, log)
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS] * 2, [
            (r.status, _failed_checks(i, r.run_id)) for r in runs
        ]
        stats = [i.get_run_stats(r.run_id) for r in runs]
        embedded = [_run_figure(i, r.run_id, "run_rows_embedded") for r in runs]
        warnings = [w for r in runs for w in _failed_checks(i, r.run_id)]

        # the next run embeds what was edited after the two had passed it
        dagster(*launch, "--tags", json.dumps(tags), env=env)
        [third] = [
            r
            for r in wait_for("the next run", lambda: finished(3), 240, log)
            if r.run_id not in {run.run_id for run in runs}
        ]
        assert third.status == dg.DagsterRunStatus.SUCCESS
        assert not _failed_checks(i, third.run_id)

    starts = sorted((s.start_time or 0.0, s.end_time or 0.0) for s in stats)
    assert starts[1][0] < starts[0][1], "the second run started before the first ended"
    assert all(n > 0 for n in embedded), f"each run embedded part: {embedded}"
    assert len(ids) <= sum(embedded) <= len(ids) + len(edited)
    # what one run met of the other's work is reported, never an error
    assert all(severity == "WARN" for _, severity in warnings), warnings
    assert_embedded(Settings(database_url=url), ids, OPENAI_ID)
    with db.connection(url, vector=False) as conn:
        [(state,)] = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'messages_embedding_hnsw_idx'"
            "::regclass"
        ).fetchall()
    assert state is True


def _embedded(url: str, at_least: int) -> bool | None:
    with db.connection(url, vector=False) as conn:
        row = conn.execute("SELECT count(embedding) FROM messages").fetchone()
    return True if row and row[0] >= at_least else None


def _edit(url: str, ids: list[int]) -> list[int]:
    """Edit the text of 10 embedded rows and 10 rows still waiting; their ids."""
    with db.connection(url, vector=False) as conn:
        rows = conn.execute(
            "(SELECT id FROM messages WHERE id = ANY(%(ids)s) AND embedding IS NOT NULL "
            "ORDER BY id LIMIT 10) UNION ALL (SELECT id FROM messages WHERE id = ANY(%(ids)s) "
            "AND embedding IS NULL ORDER BY id DESC LIMIT 10)",
            {"ids": ids},
        ).fetchall()
        edited = [int(r[0]) for r in rows]
        conn.execute(
            "UPDATE messages SET content = content || ' (edited)' WHERE id = ANY(%s)", (edited,)
        )
        conn.commit()
    return edited


def _failed_checks(instance: dg.DagsterInstance, run_id: str) -> list[tuple[str, str]]:
    """(check, severity) of each check that did not pass in the run."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ).records
    out = []
    for record in records:
        event = record.event_log_entry.dagster_event
        evaluation = event.event_specific_data if event else None
        if isinstance(evaluation, dg.AssetCheckEvaluation) and not evaluation.passed:
            out.append((evaluation.check_name, evaluation.severity.value))
    return out


def dagster(*args: str, env: dict[str, str]) -> None:
    done = subprocess.run([str(BIN / "dagster"), *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _run_figure(instance: dg.DagsterInstance, run_id: str, key: str) -> int:
    """A run-level figure from the run's materialization metadata (the same on each month)."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    event = records[0].event_log_entry.dagster_event
    assert event is not None and event.step_materialization_data is not None
    value = event.step_materialization_data.materialization.metadata[key].value
    assert isinstance(value, int)
    return value
