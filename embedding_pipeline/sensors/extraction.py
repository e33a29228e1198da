"""`extraction_sensor`: new extractions launch embedding runs for the months they touched.

Each tick reads the extractions committed since its cursor (primary-key lookups), finds
the months of the rows they created or changed (the `<table>_extraction_id_idx` index),
keeps, per table, those months that still have rows due for embedding (the partial
pending index: a row another run embedded meanwhile is not work), and requests at most
one run per table, of `embed_<table>` over those months. A table whose months a queued
or running run already covers (a backlog run, a backfill, this sensor's own earlier run)
gets no second run: its extractions are looked at again on the next ticks (as the
cursor's gaps are, for up to `gap_grace_seconds`), and launch a run then only if rows
are still due. So one ingest is at most one run per table, whichever sensor sees it first
(`sensors/planning.py`), and no run is launched that would embed nothing.

Run keys name the extractions, the table, its months and the tick's cursor: a tick
evaluated again after a crash requests the same keys, and Dagster launches nothing twice.

The first tick (no cursor yet) starts after the newest extraction (or at the very first
one when the extractions table does not exist yet): what older extractions
left unembedded is the backlog, which `embedding-pipeline backlog` shows and a backfill
clears (replaying years of extractions through the sensor would queue a run per month and
tick for work a backfill does in one). To replay history instead, set the cursor to `0` in
the UI (the sensor's page) or with `dagster sensor cursor extraction_sensor --set 0`.

The partitions are static monthly ones (`partitions.py`), so there are no dynamic
partitions to add.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

import dagster as dg
import psycopg

from embedding_pipeline.jobs import PARTITIONS_TAG
from embedding_pipeline.lib.quality.backlog import BacklogRow, table_pending
from embedding_pipeline.lib.sources.extractions import (
    ExtractionCursor,
    initial_cursor,
    read_new_extractions,
    touched_months,
)
from embedding_pipeline.lib.store.catalog import relation_exists
from embedding_pipeline.partitions import partition_key_for, partition_mapper, window_for
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.sensors.planning import busy_with, in_flight, table_run
from embedding_pipeline.settings import Settings

SENSOR_NAME = "extraction_sensor"
EXTRACTIONS_TAG = "embedding_pipeline/extractions"


def describe_ids(ids: list[int]) -> str:
    """A short label for a sorted list of extraction ids (for run keys, tags and logs)."""
    if not ids:
        return "none"
    if len(ids) == 1:
        return str(ids[0])
    return f"{ids[0]}..{ids[-1]} ({len(ids)})"


def run_key_for(ids: list[int], table_key: str, months: Sequence[str], cursor: str) -> str:
    """Stable for the same extractions, table, months and input cursor; different for
    any other (a later tick that finds the rows still due asks again)."""
    text = ",".join(map(str, ids)) + "|" + cursor
    digest = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
    span = months[0] if len(months) == 1 else f"{months[0]}...{months[-1]}"
    return f"extractions:{ids[0]}-{ids[-1]}:{digest[:12]}:{table_key}:{span}"


def build_extraction_sensor(
    settings: Settings,
    partitions_def: dg.TimeWindowPartitionsDefinition,
    jobs: Sequence[dg.UnresolvedAssetJobDefinition],
) -> dg.SensorDefinition:
    """The sensor for `settings` (interval, tables) over `partitions_def`, launching the
    `embed_<table>` jobs among `jobs`."""
    asset_keys = {key: dg.AssetKey(spec.asset_name) for key, spec in settings.tables.items()}
    sensor_settings = settings.sensor
    partition_for = partition_mapper(partitions_def)

    def pending_rows(
        conn: psycopg.Connection,
        settings: Settings,
        touched: Mapping[str, set[str]],
        model_id: str,
    ) -> dict[str, list[BacklogRow]]:
        """Per touched table, its pending rows per month within the touched months."""
        out = {}
        for key, keys in touched.items():
            first = partitions_def.time_window_for_partition_key(min(keys))
            last = partitions_def.time_window_for_partition_key(max(keys))
            window = window_for(partitions_def, dg.TimeWindow(first.start, last.end))
            out[key] = table_pending(conn, settings.tables[key], model_id, partition_for, window)
        conn.rollback()
        return out

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=sensor_settings.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        jobs=jobs,
        description="Launches one embedding run per table for the months that new "
        "extractions touched and that still have rows due, unless a queued or running run "
        "covers them; the cursor is the last extraction id seen.",
    )
    def extraction_sensor(
        context: dg.SensorEvaluationContext,
        postgres: PostgresResource,
        embedder: EmbedderResource,
    ) -> dg.SensorResult:
        cursor = ExtractionCursor.parse(context.cursor)
        with postgres.connection(vector=False) as conn:
            if not relation_exists(conn, settings.extraction_table):
                # every extraction to come is new: the first one must not count as backlog
                return dg.SensorResult(
                    skip_reason=f"table {settings.extraction_table} does not exist yet",
                    cursor=ExtractionCursor(last_id=0).serialize(),
                )
            if context.cursor is None:
                start = initial_cursor(conn, settings.extraction_table, now=time.time())
                return dg.SensorResult(
                    skip_reason=f"started: watching extractions after id {start.last_id}; "
                    "rows of earlier ones that still need embedding are the backlog "
                    "(`embedding-pipeline backlog`, then a backfill)",
                    cursor=start.serialize(),
                )
            new = read_new_extractions(
                conn,
                settings.extraction_table,
                cursor,
                limit=sensor_settings.max_extractions_per_tick,
                now=time.time(),
                grace_seconds=sensor_settings.gap_grace_seconds,
            )
            months = touched_months(conn, settings.tables.items(), new.ids)
            conn.rollback()
        next_cursor = new.cursor.serialize()
        if not new.ids:
            return dg.SensorResult(
                skip_reason=f"no new extraction after id {cursor.last_id}", cursor=next_cursor
            )

        touched: dict[str, set[str]] = defaultdict(set)
        for key, moments in months.items():
            for moment in moments:
                touched[key].add(partition_key_for(partitions_def, moment))
        label = describe_ids(new.ids)
        if not touched:
            return dg.SensorResult(
                skip_reason=f"extractions {label} changed no embedded text", cursor=next_cursor
            )

        with postgres.connection(vector=False) as conn:
            due = {
                key: {r.partition for r in rows if r.needs_embedding}
                for key, rows in pending_rows(conn, settings, touched, embedder.model_id).items()
            }
        spans = in_flight(context.instance, settings)
        run_requests: list[dg.RunRequest] = []
        notes: list[str] = []
        deferred = False
        for key in sorted(touched):
            work = sorted(touched[key] & due.get(key, set()))
            if not work:
                notes.append(f"{key}: nothing due (embedded meanwhile)")
                continue
            busy = busy_with(spans, asset_keys[key], work)
            if busy:
                notes.append(f"{key} waits for run {busy}")
                deferred = True
                continue
            run_requests.append(
                table_run(
                    settings,
                    key,
                    work,
                    run_key=run_key_for(new.ids, key, work, context.cursor or ""),
                    trigger="sensor",
                    tags={EXTRACTIONS_TAG: label},
                )
            )
        if deferred:
            # look at these extractions again on the next ticks, as at gaps
            next_cursor = new.cursor.deferring(
                new.ids,
                now=time.time(),
                grace_seconds=sensor_settings.gap_grace_seconds,
                since=cursor.gaps,
            ).serialize()
        summary = f"extractions {label}: " + "; ".join(
            [f"{r.job_name} over {r.tags[PARTITIONS_TAG]}" for r in run_requests] + notes
        )
        context.log.info(summary + (" (more extractions pending)" if new.more else ""))
        if not run_requests:
            return dg.SensorResult(skip_reason=summary, cursor=next_cursor)
        return dg.SensorResult(run_requests=run_requests, cursor=next_cursor)

    return extraction_sensor
