"""Materializing the assets in this process (for the CLI and the demo), recorded on the
Dagster instance of DAGSTER_HOME so that the UI shows the same history."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import dagster as dg

from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.settings import Settings

#: Show the assets' own progress lines (INFO), not every framework event (DEBUG).
_QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def materialize_all(
    settings: Settings,
    *,
    only: Iterable[str] | None = None,
    instance: dg.DagsterInstance | None = None,
) -> dict[str, dict[str, Any]]:
    """Materialize the source assets, then every partition of the embedding assets in one
    run over the whole partition range; returns each embedding asset's metadata."""
    defs = build_definitions(settings)
    keys = list(only) if only else list(settings.tables)
    instance = instance or dg.DagsterInstance.get()
    resources = defs.resources
    sources = [defs.get_assets_def(key) for key in keys]
    result = dg.materialize(sources, resources=resources, instance=instance, run_config=_QUIET)
    if not result.success:
        raise RuntimeError("materializing the source tables failed")
    embedding_defs = [defs.get_assets_def(settings.tables[key].asset_name) for key in keys]
    partitions_def = embedding_defs[0].partitions_def
    assert partitions_def is not None
    partition_keys = partitions_def.get_partition_keys()
    result = dg.materialize(
        embedding_defs,
        resources=resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": partition_keys[0],
            "dagster/asset_partition_range_end": partition_keys[-1],
        },
        raise_on_error=False,
        run_config=_QUIET,
    )
    if not result.success:
        failures = [e.message for e in result.all_events if e.is_failure]
        raise RuntimeError(
            "materializing embeddings failed: " + "; ".join(f for f in failures if f)
        )
    out: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        name = materialization.asset_key.to_user_string()
        if name not in out:
            out[name] = {k: v.value for k, v in materialization.metadata.items()}
    return out
