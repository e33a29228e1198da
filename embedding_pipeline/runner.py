"""Materializing the assets in this process (for the CLI and the demo), recorded on the
Dagster instance of DAGSTER_HOME so that the UI shows the same history."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import dagster as dg

from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.settings import Settings

#: Show the assets' own progress lines (INFO), not every framework event (DEBUG).
_QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
_JOB = "__ephemeral_asset_job__"


class RunFailed(RuntimeError):
    """A run failed; the message names each failed step and its reason, on one line."""


@dg.logger(
    config_schema={"log_level": dg.Field(str, is_required=False, default_value="INFO")},
    description="The console logger without stack traces: the CLI prints the reasons",
)
def _one_line_console(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.Logger("embedding_pipeline", init_context.logger_config["log_level"])
    handler = logging.StreamHandler()
    handler.setFormatter(_FirstLine("%(asctime)s - %(levelname)s - %(message)s"))
    logger.addHandler(handler)
    return logger


class _FirstLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).split("\n", 1)[0]


def failure_reasons(result: dg.ExecuteInProcessResult) -> list[str]:
    """`steps: reason` for the failed steps, each reason once: a `dg.Failure`'s
    description, else the message of the exception that started it all, on one line."""
    steps_by_reason: dict[str, list[str]] = {}
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        reason = data.user_failure_data.description if data.user_failure_data else None
        error = data.error
        if not reason and error is not None:
            while error.cause is not None:
                error = error.cause
            qualified, _, message = error.message.partition(": ")
            reason = f"{error.cls_name or qualified}: {message}"
        steps = steps_by_reason.setdefault(" ".join((reason or "failed").split()), [])
        steps.append(event.step_key or "run")
    return [f"{', '.join(steps)}: {reason}" for reason, steps in steps_by_reason.items()]


def _execute(
    assets: Sequence[dg.AssetsDefinition],
    resources: Mapping[str, Any] | None,
    instance: dg.DagsterInstance,
    tags: Mapping[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    """What `dg.materialize` does, logging one line per event and raising nothing."""
    defs = dg.Definitions(
        assets=assets,
        jobs=[dg.define_asset_job(_JOB)],
        resources=resources,
        loggers={"console": _one_line_console},
    )
    return defs.resolve_job_def(_JOB).execute_in_process(
        run_config=_QUIET, instance=instance, tags=tags, raise_on_error=False
    )


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
    result = _execute(sources, resources, instance)
    if not result.success:
        raise RunFailed(
            "materializing the source tables failed: " + "; ".join(failure_reasons(result))
        )
    embedding_defs = [defs.get_assets_def(settings.tables[key].asset_name) for key in keys]
    partitions_def = embedding_defs[0].partitions_def
    assert partitions_def is not None
    partition_keys = partitions_def.get_partition_keys()
    result = _execute(
        embedding_defs,
        resources,
        instance,
        tags={
            "dagster/asset_partition_range_start": partition_keys[0],
            "dagster/asset_partition_range_end": partition_keys[-1],
        },
    )
    if not result.success:
        raise RunFailed("materializing embeddings failed: " + "; ".join(failure_reasons(result)))
    out: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        name = materialization.asset_key.to_user_string()
        if name not in out:
            out[name] = {k: v.value for k, v in materialization.metadata.items()}
    return out
