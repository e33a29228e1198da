"""Dagster runs in the test process: an asset over one partition, the embedding assets over
the small test chat's months, and everything a run recorded."""

from __future__ import annotations

import json

import dagster as dg

from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.settings import Settings


def materialize(
    asset: dg.AssetsDefinition,
    settings: Settings,
    embedder: EmbedderResource,
    partition: str,
    instance: dg.DagsterInstance,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    """One run of `asset` over `partition` with `embedder` and the settings' database."""
    return dg.materialize(
        [asset],
        partition_key=partition,
        instance=instance,
        raise_on_error=raise_on_error,
        resources={
            "postgres": PostgresResource(database_url=settings.effective_database_url),
            "embedder": embedder,
        },
    )


def embed_months(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    *names: str,
    start: str = "2025-09-01",
    end: str = "2025-10-01",
) -> dg.ExecuteInProcessResult:
    """Materialize the embedding assets `names` over the months `start` to `end` (by
    default the two the small test chat covers) in one run; it must succeed."""
    result = dg.materialize(
        [defs.get_assets_def(name) for name in names],
        resources=defs.resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": start,
            "dagster/asset_partition_range_end": end,
        },
    )
    assert result.success
    return result


def event_log_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """Everything the run recorded: its events (messages, metadata, errors) and its config."""
    entries = [dg.serialize_value(entry) for entry in instance.all_logs(run_id)]
    run = instance.get_run_by_id(run_id)
    assert run is not None and entries
    return "\n".join([*entries, json.dumps(run.run_config, default=str)])
