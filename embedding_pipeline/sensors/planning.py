"""One view of the work in flight, shared by both sensors: which tables and months the
queued and running runs of this code location cover, and the one run per table that a
sensor requests for the months that still need it.

The sensor daemon evaluates sensors one after another (the instance's default,
`sensors.use_threads: false`) and creates a tick's runs before it evaluates the next
sensor, so a run one sensor requested is in flight when the other one looks: an ingest
becomes at most one run per table, whichever sensor sees it first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dagster as dg

from embedding_pipeline.checks import per_run_check_keys
from embedding_pipeline.jobs import RUN_CHECKS, embed_job_name, range_tags, run_tags
from embedding_pipeline.settings import Settings

#: Run states in which a run still covers its tables and months.
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]

#: Run states of a run that is over.
FINISHED = [
    dg.DagsterRunStatus.SUCCESS,
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.CANCELED,
]


@dataclass(frozen=True)
class RunSpan:
    """The tables and months a queued or running run covers (None: every month)."""

    run_id: str
    asset_keys: frozenset[dg.AssetKey]
    first: str | None
    last: str | None

    def covers(self, asset: dg.AssetKey, first: str, last: str) -> bool:
        if asset not in self.asset_keys:
            return False
        if self.first is None or self.last is None:
            return True
        return self.first <= last and first <= self.last


def run_span(run: dg.DagsterRun, settings: Settings) -> RunSpan:
    tags = run.tags
    partition = tags.get("dagster/partition")
    first = tags.get("dagster/asset_partition_range_start", partition)
    last = tags.get("dagster/asset_partition_range_end", partition)
    assets = run.asset_selection or _job_assets(run.job_name, settings)
    return RunSpan(run.run_id, frozenset(assets), first, last)


def _job_assets(job_name: str, settings: Settings) -> frozenset[dg.AssetKey]:
    """The embedding assets a run of `job_name` covers when it carries no asset selection."""
    assets = {key: dg.AssetKey(spec.asset_name) for key, spec in settings.tables.items()}
    if job_name == RUN_CHECKS:
        return frozenset()
    for key, asset in assets.items():
        if job_name == embed_job_name(key):
            return frozenset([asset])
    return frozenset(assets.values())


def in_flight(instance: dg.DagsterInstance, settings: Settings) -> list[RunSpan]:
    """What every queued or running run covers."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT), limit=500)
    return [run_span(run, settings) for run in runs]


def failed_lately(
    instance: dg.DagsterInstance, table_key: str, within_seconds: float, now: float
) -> str | None:
    """The id (8 characters) of the latest finished run of `embed_<table>` when it failed
    (its retries included: a retry is a later run) less than `within_seconds` ago, else
    None. One run-storage read."""
    if within_seconds <= 0:
        return None
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=embed_job_name(table_key), statuses=FINISHED), limit=1
    )
    if not records:
        return None
    record = records[0]
    ended = record.end_time
    failed = record.dagster_run.status == dg.DagsterRunStatus.FAILURE
    if failed and ended is not None and now - ended < within_seconds:
        return record.dagster_run.run_id[:8]
    return None


def busy_with(spans: Sequence[RunSpan], asset: dg.AssetKey, months: Sequence[str]) -> str | None:
    """The id (8 characters) of a queued or running run over `asset` and any of
    `months`, or None: that run embeds what they need, or leaves it for the next tick."""
    first, last = min(months), max(months)
    return next((s.run_id[:8] for s in spans if s.covers(asset, first, last)), None)


def table_run(
    settings: Settings,
    table_key: str,
    months: Sequence[str],
    *,
    run_key: str,
    trigger: str,
    tags: Mapping[str, str] | None = None,
) -> dg.RunRequest:
    """The one run of `embed_<table>` over `months` (first to last; a single month is a
    single-partition run), carrying the asset's per-run checks."""
    asset = dg.AssetKey(settings.tables[table_key].asset_name)
    first, last = min(months), max(months)
    all_tags = {**run_tags(trigger, [table_key], months), **(tags or {})}
    return dg.RunRequest(
        run_key=run_key,
        job_name=embed_job_name(table_key),
        asset_selection=[asset],
        asset_check_keys=per_run_check_keys([asset]),
        partition_key=first if first == last else None,
        tags=all_tags if first == last else {**all_tags, **range_tags(first, last)},
    )
