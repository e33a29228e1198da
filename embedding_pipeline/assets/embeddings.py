"""`message_embeddings`, `topic_embeddings`, `atom_embeddings`: vectors for every row.

Each run owns the rows of its month partition(s), embeds those whose embedding is missing,
made from other text, or made by another model, and writes them back in committed
batches (see `lib/engine/run.py`). Re-running an up-to-date partition calls no provider. Rows
the provider refuses are recorded in the errors table and the run goes on; it fails only
when the provider cannot embed at all (unreachable past the retry deadline, key or model
refused), keeping what it wrote.

A run over a range of months is one pass of the engine (one model load, one bulk load of
the HNSW index when the backlog is large); afterwards one read of its months records each
month's own figures on that month's materialization (rows, rows embedded, what is still
missing, stale or failed; index reads when the run wrote nothing) and, where the month's
backlog differs from its latest observation, an observation of it, so the partitions view
shows each month as it is, not the run's totals (those carry a `run_` prefix).
"""

import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import dagster as dg
import psycopg

from embedding_pipeline.assets.metadata import EMBEDDINGS_CODE_VERSION, OWNERS, embedding_tags
from embedding_pipeline.jobs import missing_run_tags
from embedding_pipeline.lib.embedders import EmbeddingError
from embedding_pipeline.lib.engine.options import EngineOptions, Progress, SyncResult
from embedding_pipeline.lib.engine.row_errors import RowErrorPolicy
from embedding_pipeline.lib.engine.run import sync_embeddings
from embedding_pipeline.lib.quality.backlog import BacklogRow, window_backlog
from embedding_pipeline.lib.store.db import database_now
from embedding_pipeline.lib.store.schema import SchemaError, ensure_schema
from embedding_pipeline.partitions import partition_mapper, window_for
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.settings import Settings, TableSpec


def backfill_policy(settings: Settings) -> dg.BackfillPolicy:
    """By default a backfill is one run over its whole partition range: one process
    start, one model load, one pass in id order; fault isolation comes from the committed
    requests, not from splitting the range, and `dg launch --partition-range` (in-process)
    accepts only single-run assets. With EP_BACKFILL_PARTITIONS_PER_RUN, a backfill fans
    out over several runs that the run queue spreads over workers; the per-row claims keep
    overlapping runs from embedding a row twice (docs/operations.md, docs/deployment.md)."""
    per_run = settings.engine.backfill_partitions_per_run
    if per_run is None:
        return dg.BackfillPolicy.single_run()
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=per_run)


def engine_options(
    settings: Settings, embedder: EmbedderResource, run_label: str = ""
) -> EngineOptions:
    """The engine's options for a run, from the settings and the embedder resource;
    `run_label` names the run in its claiming session."""
    e = settings.engine
    return EngineOptions(
        session_label=run_label,
        batch_size=embedder.effective_batch_size,
        concurrency=embedder.settings.concurrency,
        row_errors=RowErrorPolicy(
            max_attempts=e.row_max_attempts, retry_base_seconds=e.row_retry_base_seconds
        ),
        progress_interval_seconds=e.progress_interval_seconds,
        claim_size=e.claim_size,
        write_connections=e.write_connections,
    )


def provider_pool(settings: Settings) -> str:
    """The Dagster concurrency pool of the configured provider: its limit (set on the
    instance, docs/operations.md) caps the runs calling that provider at once."""
    return f"embeddings_{settings.embedder.provider}"


def run_details(result: SyncResult) -> dict[str, Any]:
    """The engine's figures for the whole run, grouped in one `run_details` value so that
    a materialization lists a dozen keys, the month's own first. Types never change from
    run to run: counts are ints, times floats in seconds."""
    return {
        "rows_in_run": result.rows_in_window,
        "pending_at_start": result.pending_at_start,
        "up_to_date": result.skipped_up_to_date,
        "failed": result.failed,
        "failed_samples": [
            {"id": rid, "reason": reason} for rid, reason in result.failed_samples[:10]
        ],
        "empty_text": len(result.empty_text_ids),
        "vectors_withdrawn": result.withdrawn,
        "truncated": result.truncated,
        "changed_during_run": result.changed_during_run,
        "skipped_locked": result.skipped_locked,
        "stale_model_at_start": result.stale_model_at_start,
        "dimension": result.dimension,
        "claims": result.claims,
        "provider_requests": result.provider_requests,
        "isolation_requests": result.isolation_requests,
        "estimated_tokens": result.estimated_tokens,
        "retries": result.retries,
        "retry_seconds_waited": round(result.retry_seconds, 3),
        "rate_limit_seconds_waited": round(result.rate_limit_seconds, 3),
        "reconnects": result.reconnects,
        "index_strategy": result.index_strategy,
        "index_build_seconds": round(result.index_seconds, 3),
        "seconds_without_index": round(result.seconds_without_index, 3),
        "rows_per_second": round(result.rows_per_second, 1),
        START_SNAPSHOT_KEY: result.start_snapshot,
    }


#: Key, in `run_details`, of the database snapshot taken when the run started: the
#: blocking check `no_missing_embeddings` holds the run to the rows that existed then.
START_SNAPSHOT_KEY = "start_snapshot"


def backlog_metadata(row: BacklogRow | None) -> dict[str, Any]:
    """A month's backlog as observed now (by a run at its end, or by the backlog sensor):
    the keys the partitions view shows beside the month's latest materialization."""
    return {
        "backlog_missing": row.missing if row else 0,
        "backlog_stale": row.stale if row else 0,
        "backlog_failed": row.failed if row else 0,
        "backlog_needs_embedding": row.needs_embedding if row else 0,
    }


def partition_metadata(row: BacklogRow | None, model_id: str) -> dict[str, Any]:
    """One month's own figures after a run over it, listed first: its rows, those
    embedded since the run started, those already current, and what is still missing,
    stale or failed (the provider refused its current text). A month without rows says
    only that: in a run over a range (a backfill of every month), the asset page's
    "latest materialization" is the last month, often empty, and should show the run's
    figures that follow rather than a column of zeros."""
    rows = row.rows or 0 if row else 0
    if not rows:
        return {"rows_in_partition": 0}
    embedded = row.embedded or 0 if row else 0
    pending = (row.needs_embedding + row.failed) if row else 0
    return {
        "rows_in_partition": rows,
        "rows_embedded": embedded,
        "rows_skipped_up_to_date": max(rows - embedded - pending, 0),
        "rows_missing": row.missing if row else 0,
        "rows_stale": row.stale if row else 0,
        "rows_failed": row.failed if row else 0,
        "model": model_id,
    }


def run_metadata(result: SyncResult, label: str, started: datetime) -> dict[str, Any]:
    """The run's own figures, after each month's: which months, rows embedded and failed
    in all of them, when it started (the database's clock), how long it took, and the
    engine's details."""
    return {
        "run_partitions": label,
        "run_rows_embedded": result.embedded,
        "run_rows_failed": result.failed,
        "run_seconds": round(result.seconds, 3),
        RUN_STARTED_KEY: dg.MetadataValue.timestamp(started),
        "run_details": dg.MetadataValue.json(run_details(result)),
    }


#: Metadata key of the database time a run's embedding step started.
RUN_STARTED_KEY = "run_started_at"


def _record_partitions(
    context: dg.AssetExecutionContext,
    rows: Sequence[BacklogRow],
    model_id: str,
    run: Mapping[str, Any],
) -> None:
    """Each month of the run gets its own materialization figures, and an observation of
    its backlog where that differs from the month's latest observation (a month never
    observed counts as observed empty): a no-op run over every month writes no
    observation at all, and a month repaired by the run shows 0 again."""
    by_partition = {r.partition: r for r in rows}
    observed = _latest_observed_backlogs(context, context.partition_keys)
    for key in context.partition_keys:
        row = by_partition.get(key)
        context.add_asset_metadata({**partition_metadata(row, model_id), **run}, partition_key=key)
        backlog = backlog_metadata(row)
        if observed[key] == _backlog_counts(backlog):
            continue
        context.log_event(
            dg.AssetObservation(
                asset_key=context.asset_key,
                partition=key,
                metadata={**backlog, "observed_by": f"run {context.run.run_id[:8]}"},
            )
        )


_BACKLOG_KEYS = ("backlog_missing", "backlog_stale", "backlog_failed")
_EMPTY_BACKLOG = (0, 0, 0)


def _backlog_counts(metadata: Mapping[str, Any]) -> tuple[int, ...]:
    """(missing, stale, failed) of backlog metadata, plain or as Dagster metadata values."""
    return tuple(
        int(getattr(metadata.get(k), "value", metadata.get(k)) or 0) for k in _BACKLOG_KEYS
    )


def _latest_observed_backlogs(
    context: dg.AssetExecutionContext, months: Sequence[str]
) -> dict[str, tuple[int, ...] | None]:
    """Per month, its latest observed backlog (the run's or the backlog sensor's), from one
    read of the newest observations: empty for a month never observed, None (unknown) for
    a month beyond what the read returned."""
    limit = 2 * len(months) + 10
    records = context.instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=list(months)),
        limit=limit,
    ).records
    latest: dict[str, tuple[int, ...]] = {}
    for record in records:  # newest first
        observation = record.asset_observation
        if observation is not None and str(observation.partition) not in latest:
            latest[str(observation.partition)] = _backlog_counts(observation.metadata)
    unseen = _EMPTY_BACKLOG if len(records) < limit else None
    return {month: latest.get(month, unseen) for month in months}


def build_embedding_asset(
    source: str,
    spec: TableSpec,
    settings: Settings,
    partitions_def: dg.TimeWindowPartitionsDefinition,
) -> dg.AssetsDefinition:
    with warnings.catch_warnings():
        # `backfill_policy` is beta in Dagster 1.13 and chosen deliberately (single run by
        # default, docs/operations.md): silence that warning for this call only
        warnings.filterwarnings("ignore", message=".*backfill_policy", category=dg.BetaWarning)
        embeddings_asset = dg.asset(
            name=spec.asset_name,
            deps=[dg.AssetKey(source)],
            partitions_def=partitions_def,
            backfill_policy=backfill_policy(settings),
            pool=provider_pool(settings),
            group_name="embeddings",
            kinds={"postgres", "pgvector"},
            owners=OWNERS,
            tags=embedding_tags(source, settings),
            code_version=EMBEDDINGS_CODE_VERSION,
            description=f"Embedding vectors of `{spec.table}`, kept current per month partition.",
        )

    @embeddings_asset
    def _embeddings(
        context: dg.AssetExecutionContext, postgres: PostgresResource, embedder: EmbedderResource
    ) -> dg.MaterializeResult:
        window = window_for(partitions_def, context.partition_time_window)
        model = embedder.build()
        partitions = context.partition_key_range
        label = (
            partitions.start
            if partitions.start == partitions.end
            else f"{partitions.start}..{partitions.end}"
        )

        tags = missing_run_tags(context.run.tags, [source], context.partition_keys)
        if tags:
            context.instance.add_run_tags(context.run.run_id, tags)

        def progress(p: Progress) -> None:
            context.log.info(f"{spec.table} {label}: {p.describe()}")

        try:
            with postgres.connection(vector=False) as conn:
                ensure_schema(conn, settings, model.dimension, model.model_id)
                started = database_now(conn)
            with postgres.connection() as conn:
                result = sync_embeddings(
                    conn,
                    spec,
                    model,
                    window,
                    options=engine_options(settings, embedder, f"run {context.run.run_id[:8]}"),
                    on_progress=progress,
                    index=settings.hnsw,
                    reconnect=postgres.connect,
                )
            with postgres.connection(vector=False) as conn:
                months = window_backlog(
                    conn,
                    spec,
                    model.model_id,
                    partition_mapper(partitions_def),
                    window,
                    started,
                    wrote=bool(result.embedded or result.failed),
                )
        except (EmbeddingError, SchemaError, psycopg.OperationalError) as exc:
            raise dg.Failure(
                description=_one_line(str(exc)),
                metadata={
                    "table": spec.table,
                    "model": model.model_id,
                    "partitions": label,
                },
            ) from None
        if result.stale_model_at_start:
            context.log.warning(
                f"{result.stale_model_at_start} {spec.table} rows had vectors of another model "
                f"and were re-embedded in place with {model.model_id}: while that happens the "
                "column mixes two models; `embedding-pipeline model switch` avoids it."
            )
        if result.failed:
            samples = ", ".join(f"{rid} ({why})" for rid, why in result.failed_samples[:5])
            context.log.warning(
                f"{result.failed} {spec.table} rows could not be embedded and are recorded in "
                f"the errors table (`embedding-pipeline errors list`): {samples}"
            )
        context.log.info(
            f"{spec.table} {label}: embedded {result.embedded}, failed {result.failed}, up to "
            f"date {result.skipped_up_to_date}, in {result.seconds:.2f}s"
        )
        _record_partitions(context, months, model.model_id, run_metadata(result, label, started))
        return dg.MaterializeResult()

    return _embeddings


def _one_line(text: str) -> str:
    return " ".join(text.split())
