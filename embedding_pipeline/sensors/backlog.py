"""`backlog_sensor`: any row without a current embedding is embedded within one interval
plus a run, whatever the cause, and the UI shows each month's backlog as it is.

The extraction sensor reacts to new extractions only. This one looks at the rows
themselves, every `EP_BACKLOG_SENSOR_INTERVAL_SECONDS` (default 10): rows inserted or
edited by the application directly in SQL, vectors set to NULL, rows embedded by another
model, rows whose earlier failure is due for another try (the errors table). Each tick:

1. per table, reads the months with rows that need embedding (`table_pending` of
   `lib/quality/backlog.py`: one pass over the partial "pending" index, so the cost
   follows the backlog, not the table) and the state of its HNSW index;
2. per table with rows due, or with a missing or invalid index (the run builds it at its
   end), requests one run of `embed_<table>` over the months from the first to the last
   with work (one month: a single-partition run). A table already covered by a queued or
   running run of any embedding job is left for the next tick, so runs never pile up; the
   run key (`backlog:<table>:<months>:<tick>`) makes a tick evaluated again after a daemon
   crash launch nothing twice;
3. reports what changed since the last tick, so the UI tells the truth without a run:
   - per month of each embedding asset, an `AssetObservation` with the month's
     `backlog_missing`, `backlog_stale`, `backlog_failed` (shown beside the month's latest
     materialization in the asset's Partitions tab; a month back to 0 is reported once);
   - per embedding asset, an evaluation of the `embedding_lag` check (pending rows per
     month, age of the oldest), which the catalog and the lineage graph show;
   - per source table (`messages`, ..., external assets: the application writes them), an
     `AssetObservation` carrying the rows needing embedding and the per-month backlog.

Rows recorded as failed and not due yet (`backlog_failed`) launch nothing: the errors
table decides when they are tried again (`embedding-pipeline errors`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import dagster as dg
import psycopg

from embedding_pipeline.assets.embeddings import backlog_metadata
from embedding_pipeline.checks import LAG, lag_outcome
from embedding_pipeline.lib.quality.backlog import BacklogRow, render_markdown, table_pending
from embedding_pipeline.lib.store.catalog import index_state, relation_exists
from embedding_pipeline.lib.store.db import database_now
from embedding_pipeline.lib.store.hnsw import hnsw_index_name
from embedding_pipeline.partitions import partition_mapper
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.sensors.planning import busy_with, failed_lately, in_flight, table_run
from embedding_pipeline.settings import Settings, TableSpec

BACKLOG_SENSOR = "backlog_sensor"
REASON_TAG = "embedding_pipeline/backlog"


@dataclass
class BacklogCursor:
    """What the previous ticks reported: a tick counter for run keys, each table's months
    with a backlog (missing, stale, failed), and fingerprints of the lag and source
    reports, so that only changes are reported again."""

    tick: int = 0
    months: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    reported: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> BacklogCursor:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(
            tick=int(data.get("tick", 0)),
            months=data.get("months", {}),
            reported=data.get("reported", {}),
        )

    def serialize(self) -> str:
        return json.dumps(
            {"tick": self.tick, "months": self.months, "reported": self.reported},
            sort_keys=True,
        )


@dataclass(frozen=True)
class TableState:
    """One table as a tick sees it."""

    key: str
    spec: TableSpec
    rows: list[BacklogRow]
    index: str | None

    @property
    def months_due(self) -> list[str]:
        return [r.partition for r in self.rows if r.needs_embedding]

    @property
    def index_missing(self) -> bool:
        return self.index != "valid"

    def months_to_run(self, last_partition: str) -> list[str]:
        """The months a run of this table should cover: those with rows due, else the
        last month when the HNSW index is missing or invalid (the run builds it at its
        end), else none."""
        return self.months_due or ([last_partition] if self.index_missing else [])

    def reason(self) -> str:
        parts = []
        missing = sum(r.missing for r in self.rows)
        stale = sum(r.stale for r in self.rows)
        if missing:
            parts.append(f"{missing} missing")
        if stale:
            parts.append(f"{stale} stale")
        if self.index_missing:
            parts.append(f"HNSW index {self.index or 'missing'}")
        return ", ".join(parts)


def read_tables(
    conn: psycopg.Connection,
    tables: Iterable[tuple[str, TableSpec]],
    model_id: str,
    partitions_def: dg.TimeWindowPartitionsDefinition,
) -> list[TableState]:
    """Each table's pending months and index state: index lookups only."""
    partition_for = partition_mapper(partitions_def)
    states = [
        TableState(
            key=key,
            spec=spec,
            rows=table_pending(conn, spec, model_id, partition_for),
            index=index_state(conn, hnsw_index_name(spec)),
        )
        for key, spec in tables
    ]
    conn.rollback()
    return states


def _fingerprint(value: object) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]


def _month_events(
    state: TableState, previous: Mapping[str, list[int]]
) -> tuple[list[dg.AssetObservation], dict[str, list[int]]]:
    """Observations of the months whose backlog changed (a month back to 0 once), and the
    months with a backlog now."""
    asset = dg.AssetKey(state.spec.asset_name)
    now = {
        r.partition: [r.missing, r.stale, r.failed]
        for r in state.rows
        if r.needs_embedding or r.failed
    }
    by_month = {r.partition: r for r in state.rows}
    events = [
        dg.AssetObservation(
            asset_key=asset,
            partition=month,
            metadata={**backlog_metadata(by_month.get(month)), "observed_by": BACKLOG_SENSOR},
        )
        for month in sorted(set(now) | set(previous))
        if now.get(month, [0, 0, 0]) != previous.get(month)
    ]
    return events, now


def _lag_event(
    state: TableState, now: datetime, warn_minutes: float, previous: str | None
) -> tuple[dg.AssetCheckEvaluation | None, str]:
    outcome = lag_outcome(state.rows, now, warn_minutes)
    fingerprint = _fingerprint(
        [outcome.passed, {r.partition: r.needs_embedding for r in state.rows}]
    )
    if fingerprint == previous:
        return None, fingerprint
    event = dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey(state.spec.asset_name),
        check_name=LAG,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=outcome.description,
        metadata={**outcome.metadata, "observed_by": BACKLOG_SENSOR},
    )
    return event, fingerprint


def _source_event(
    state: TableState, previous: str | None
) -> tuple[dg.AssetObservation | None, str]:
    work = [r.as_dict() for r in state.rows if r.needs_embedding or r.failed]
    fingerprint = _fingerprint(
        [(r["partition"], r["missing"], r["stale"], r["failed"]) for r in work]
    )
    if fingerprint == previous:
        return None, fingerprint
    event = dg.AssetObservation(
        asset_key=state.key,
        description=f"`{state.spec.table}` as the backlog sensor found it",
        metadata={
            "table": state.spec.table,
            "rows_needing_embedding": sum(r.needs_embedding for r in state.rows),
            "rows_failed_waiting": sum(r.failed for r in state.rows),
            "backlog": dg.MetadataValue.md(render_markdown(state.rows)),
            "backlog_by_partition": dg.MetadataValue.json(work),
            "observed_by": BACKLOG_SENSOR,
        },
    )
    return event, fingerprint


def _unembeddable(state: TableState) -> str:
    """What the table holds that no run will embed: rows given up or waiting for another
    try, and empty texts (nothing to embed)."""
    given_up = sum(r.given_up for r in state.rows)
    waiting = sum(r.failed for r in state.rows) - given_up
    empty = sum(r.empty for r in state.rows)
    parts = []
    if given_up:
        parts.append(f"{given_up} given up (no vector; `embedding-pipeline errors list`)")
    if waiting:
        parts.append(f"{waiting} refused, to be tried again")
    if empty:
        parts.append(f"{empty} with empty text")
    return f"{state.key}: " + ", ".join(parts) if parts else ""


def build_backlog_sensor(
    settings: Settings,
    partitions_def: dg.TimeWindowPartitionsDefinition,
    jobs: Sequence[dg.UnresolvedAssetJobDefinition],
) -> dg.SensorDefinition:
    """The sensor for `settings` over `partitions_def`, launching the `embed_<table>` jobs."""
    last_partition = partitions_def.get_last_partition_key()
    assert last_partition is not None
    warn_minutes = settings.checks.freshness_warn_minutes
    backoff = settings.sensor.backlog_failure_backoff_seconds

    @dg.sensor(
        name=BACKLOG_SENSOR,
        minimum_interval_seconds=settings.sensor.backlog_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        jobs=jobs,
        description="Repairs any drift: launches embedding runs for the months and tables "
        "with rows missing, stale or due for a retry, and for a missing HNSW index; reports "
        "each month's backlog, the embedding lag and the source tables' backlog.",
    )
    def backlog_sensor(
        context: dg.SensorEvaluationContext,
        postgres: PostgresResource,
        embedder: EmbedderResource,
    ) -> dg.SensorResult:
        cursor = BacklogCursor.parse(context.cursor)
        with postgres.connection(vector=False) as conn:
            absent = [
                s.table for s in settings.tables.values() if not relation_exists(conn, s.table)
            ]
            if absent:
                return dg.SensorResult(
                    skip_reason=f"no table {', '.join(absent)} yet (`embedding-pipeline schema`)",
                    cursor=cursor.serialize(),
                )
            now = database_now(conn)
            states = read_tables(conn, settings.tables.items(), embedder.model_id, partitions_def)

        spans = in_flight(context.instance, settings)
        now_s = time.time()
        requests: list[dg.RunRequest] = []
        waiting: list[str] = []
        events: list[dg.AssetObservation | dg.AssetCheckEvaluation] = []
        next_cursor = BacklogCursor(tick=cursor.tick + 1)
        for state in states:
            months = state.months_to_run(last_partition)
            if months:
                busy = busy_with(spans, dg.AssetKey(state.spec.asset_name), months)
                if busy:
                    waiting.append(f"{state.key} ({state.reason()}) waits for run {busy}")
                # its latest run failed a moment ago: no relaunch at every tick
                elif failed := failed_lately(context.instance, state.key, backoff, now_s):
                    waiting.append(
                        f"{state.key} ({state.reason()}) waits: run {failed} failed less than "
                        f"{backoff:g} s ago (EP_BACKLOG_FAILURE_BACKOFF_SECONDS)"
                    )
                else:
                    span = months[0] if len(months) == 1 else f"{months[0]}...{months[-1]}"
                    requests.append(
                        table_run(
                            settings,
                            state.key,
                            months,
                            run_key=f"backlog:{state.key}:{span}:{cursor.tick}",
                            trigger="backlog",
                            tags={REASON_TAG: state.reason()},
                        )
                    )
            observations, next_cursor.months[state.key] = _month_events(
                state, cursor.months.get(state.key, {})
            )
            events.extend(observations)
            lag, next_cursor.reported[f"lag:{state.key}"] = _lag_event(
                state, now, warn_minutes, cursor.reported.get(f"lag:{state.key}")
            )
            source, next_cursor.reported[f"source:{state.key}"] = _source_event(
                state, cursor.reported.get(f"source:{state.key}")
            )
            events.extend(e for e in (lag, source) if e is not None)

        for request in requests:
            context.log.info(
                f"{request.job_name} over {request.tags.get('embedding_pipeline/partitions')}: "
                f"{request.tags[REASON_TAG]}"
            )
        if requests:
            return dg.SensorResult(
                run_requests=requests, asset_events=events, cursor=next_cursor.serialize()
            )
        next_cursor.tick = cursor.tick
        reason = "; ".join(waiting + [s for s in map(_unembeddable, states) if s])
        if not waiting:
            reason = reason or "every row has a current embedding"
        return dg.SensorResult(
            skip_reason=reason, asset_events=events, cursor=next_cursor.serialize()
        )

    return backlog_sensor
