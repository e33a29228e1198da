"""The composition root: the only place that assembles the definitions and wires resources
(the runner copies them to attach its console logger)."""

from __future__ import annotations

import dagster as dg

from embedding_pipeline.assets import build_embedding_asset, build_source_spec
from embedding_pipeline.checks import build_checks, build_checks_schedule, per_run_check_keys
from embedding_pipeline.jobs import build_jobs
from embedding_pipeline.partitions import monthly_partitions
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.sensors import build_backlog_sensor, build_extraction_sensor
from embedding_pipeline.settings import Settings, load_settings


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """Resources for `settings`; secrets stay environment-variable references."""
    e = settings.embedder
    database_url: str | dg.EnvVar = (
        dg.EnvVar("DATABASE_URL") if settings.database_url else settings.embedded.url
    )
    return {
        "postgres": PostgresResource(database_url=database_url),
        "embedder": EmbedderResource.from_settings(
            e, openai_api_key=dg.EnvVar("OPENAI_API_KEY") if e.provider == "openai" else None
        ),
    }


def build_definitions(
    settings: Settings, resources: dict[str, dg.ConfigurableResource] | None = None
) -> dg.Definitions:
    partitions_def = monthly_partitions(settings.partition_start)
    assets: list[dg.AssetsDefinition | dg.AssetSpec] = []
    for name, spec in settings.tables.items():
        assets.append(build_source_spec(name, spec, settings))
        assets.append(build_embedding_asset(name, spec, settings, partitions_def))
    jobs = build_jobs(
        settings,
        per_run_check_keys(dg.AssetKey(spec.asset_name) for spec in settings.tables.values()),
    )
    embed_jobs = [job for job in jobs if job.name.startswith("embed_")]
    return dg.Definitions(
        assets=assets,
        asset_checks=build_checks(settings),
        jobs=jobs,
        sensors=[
            build_extraction_sensor(settings, partitions_def, embed_jobs),
            build_backlog_sensor(settings, partitions_def, embed_jobs),
        ],
        schedules=[build_checks_schedule(settings)],
        resources=resources if resources is not None else build_resources(settings),
        # One process runs all steps of a run: the local model loads once, and a process
        # started per asset and check step (seconds each on two cores) would cost more
        # than the work of a typical run. Parallelism comes from runs, not steps.
        executor=dg.in_process_executor,
    )


defs = build_definitions(load_settings())
