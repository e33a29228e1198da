"""`extraction_sensor`: new extractions launch embedding runs for the partitions they touched.

Each tick reads the extractions committed since its cursor (primary-key lookups), finds
the months of the rows they created or changed (the `<table>_extraction_id_idx` index),
and requests one run per month partition for the embedding assets of the tables touched
there. A run embeds only the rows of its partition that need it, so the work done equals
the new and changed rows. Run keys name the extractions and the partition: a tick
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
from collections.abc import Sequence

import dagster as dg

from embedding_pipeline.checks import per_run_check_keys
from embedding_pipeline.jobs import job_for_tables, run_tags
from embedding_pipeline.lib.extractions import (
    ExtractionCursor,
    initial_cursor,
    read_new_extractions,
    touched_months,
)
from embedding_pipeline.lib.schema import relation_exists
from embedding_pipeline.partitions import partition_key_for
from embedding_pipeline.resources import PostgresResource
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


def run_key_for(ids: list[int], partition_key: str) -> str:
    """Stable for the same extractions and partition, different for any other set."""
    digest = hashlib.sha1(",".join(map(str, ids)).encode(), usedforsecurity=False).hexdigest()
    return f"extractions:{ids[0]}-{ids[-1]}:{digest[:12]}:{partition_key}"


def build_extraction_sensor(
    settings: Settings,
    partitions_def: dg.TimeWindowPartitionsDefinition,
    jobs: Sequence[dg.UnresolvedAssetJobDefinition],
) -> dg.SensorDefinition:
    """The sensor for `settings` (interval, tables) over `partitions_def`, launching `jobs`
    (`embed_<table>` for one table, `embed_tables` for several)."""
    asset_keys = {key: dg.AssetKey(spec.asset_name) for key, spec in settings.tables.items()}
    sensor_settings = settings.sensor

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=sensor_settings.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        jobs=jobs,
        description="Launches embedding runs for the month partitions that new extractions "
        "touched; the cursor is the last extraction id seen.",
    )
    def extraction_sensor(
        context: dg.SensorEvaluationContext, postgres: PostgresResource
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

        tables_by_partition: dict[str, set[str]] = defaultdict(set)
        for key, moments in months.items():
            for moment in moments:
                tables_by_partition[partition_key_for(partitions_def, moment)].add(key)
        label = describe_ids(new.ids)
        if not tables_by_partition:
            return dg.SensorResult(
                skip_reason=f"extractions {label} changed no embedded text", cursor=next_cursor
            )

        run_requests = [
            dg.RunRequest(
                run_key=run_key_for(new.ids, partition_key),
                job_name=job_for_tables(keys),
                partition_key=partition_key,
                asset_selection=[asset_keys[key] for key in sorted(keys)],
                asset_check_keys=per_run_check_keys(asset_keys[key] for key in sorted(keys)),
                tags={EXTRACTIONS_TAG: label, **run_tags("sensor", keys, [partition_key])},
            )
            for partition_key, keys in sorted(tables_by_partition.items())
        ]
        context.log.info(
            f"extractions {label}: {len(run_requests)} run(s) for partitions "
            f"{', '.join(sorted(tables_by_partition))}"
            + (" (more extractions pending)" if new.more else "")
        )
        return dg.SensorResult(run_requests=run_requests, cursor=next_cursor)

    return extraction_sensor
