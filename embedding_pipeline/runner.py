"""Running the named jobs in this process (for the CLI and the demo), recorded on the
Dagster instance of DAGSTER_HOME so that the UI lists the same runs under the same job
names, with their trigger, tables and partitions as tags."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import psycopg
from dagster_shared.error import SerializableErrorInfo

from embedding_pipeline.checks import (
    CHECK_NAMES,
    CheckRaised,
    checks_step_name,
    per_run_check_keys,
)
from embedding_pipeline.definitions import build_definitions
from embedding_pipeline.jobs import MATERIALIZE_ALL, RUN_CHECKS, range_tags, run_tags
from embedding_pipeline.lib.store import db
from embedding_pipeline.partitions import monthly_partitions
from embedding_pipeline.resources import EmbedderResource
from embedding_pipeline.sensors.backlog import read_tables
from embedding_pipeline.settings import Settings


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
    defs: dg.Definitions,
    job_name: str,
    instance: dg.DagsterInstance,
    *,
    tags: Mapping[str, str],
    asset_selection: Iterable[dg.AssetKey] | None = None,
    check_selection: Iterable[dg.AssetCheckKey] | None = None,
    log_level: str = "INFO",
) -> dg.ExecuteInProcessResult:
    """One run of the named job `job_name` of `defs` in this process (recorded on
    `instance`, so the UI lists it under that job), logging one line per event and
    raising nothing."""
    with_logger = dg.Definitions(
        assets=defs.assets,
        asset_checks=defs.asset_checks,
        jobs=defs.jobs,
        resources=defs.resources,
        loggers={"console": _one_line_console},
    )
    job = with_logger.resolve_job_def(job_name)
    if asset_selection is not None or check_selection is not None:
        job = job.get_subset(
            asset_selection=set(asset_selection or ()),
            asset_check_selection=set(check_selection) if check_selection is not None else None,
        )
    return job.execute_in_process(
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        instance=instance,
        tags=tags,
        raise_on_error=False,
    )


def months_to_run(settings: Settings, keys: Iterable[str], model_id: str) -> dict[str, list[str]]:
    """Per table of `keys`, the months a run should materialize: those with rows that
    need embedding (missing, stale, failed and due), or the last month when its HNSW index
    is missing; none when the table is current. Read as the backlog sensor reads it (the
    partial pending index); a database without the pipeline's columns yet gets every
    month (the run creates them)."""
    partitions_def = monthly_partitions(settings.partition_start)
    tables = [(key, settings.tables[key]) for key in keys]
    last = partitions_def.get_last_partition_key()
    assert last is not None
    try:
        with db.connection(settings.effective_database_url, vector=False) as conn:
            states = read_tables(conn, tables, model_id, partitions_def)
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
        every = partitions_def.get_partition_keys()
        return {key: list(every) for key, _ in tables}
    return {state.key: state.months_to_run(last) for state in states}


@dataclass(frozen=True)
class Materialized:
    """What one `materialize_all` run did: each embedding asset's run figures (those it
    materialized), and the tables it left alone because nothing was due."""

    figures: dict[str, dict[str, Any]]
    current: list[str]


def materialize_all(
    settings: Settings,
    *,
    only: Iterable[str] | None = None,
    instance: dg.DagsterInstance | None = None,
    trigger: str = "cli",
    defs: dg.Definitions | None = None,
) -> Materialized:
    """One run of the `materialize_all` job: every month of the tables' embedding assets
    that has work (`months_to_run`: a table with nothing due is not materialized, so a run
    with nothing to do records no month), and the checks of every embedding asset of the
    tables. Each embedding step sets up the schema first (`ensure_schema`); the source
    tables are external assets, which no run materializes."""
    defs = defs or build_definitions(settings)
    keys = list(only) if only else list(settings.tables)
    instance = instance or dg.DagsterInstance.get()
    embedder = (defs.resources or {}).get("embedder")
    assert isinstance(embedder, EmbedderResource)
    months = months_to_run(settings, keys, embedder.model_id)
    due = [key for key in keys if months[key]]
    every_month = sorted({m for key in due for m in months[key]})
    embedding_keys = [dg.AssetKey(settings.tables[key].asset_name) for key in keys]
    selection = [dg.AssetKey(settings.tables[key].asset_name) for key in due]
    tags = run_tags(trigger, keys, every_month)
    if every_month:
        tags.update(range_tags(every_month[0], every_month[-1]))
    result = _execute(
        defs,
        MATERIALIZE_ALL,
        instance,
        tags=tags,
        asset_selection=selection,
        # the job's own checks: a subset would otherwise carry every check of its assets,
        # the sampled recall and latency searches too; a table with nothing due gets its
        # checks all the same (they then judge the table, as on their own)
        check_selection=per_run_check_keys(embedding_keys),
    )
    if not result.success:
        raise RunFailed(f"{MATERIALIZE_ALL} failed: " + "; ".join(failure_reasons(result)))
    out: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        name = materialization.asset_key.to_user_string()
        if materialization.partition is not None and name not in out:
            out[name] = {k: v.value for k, v in materialization.metadata.items()}
    current = [settings.tables[key].asset_name for key in keys if not months[key]]
    return Materialized(figures=out, current=current)


# -- running the checks (CLI and demo) -----------------------------------------------------


@dataclass(frozen=True)
class CheckOutcome:
    """One check evaluation as Dagster recorded it."""

    asset: str
    check: str
    passed: bool
    severity: str
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckRun:
    run_id: str
    seconds: float
    outcomes: list[CheckOutcome]

    @property
    def errors(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if not o.passed and o.severity == "ERROR"]

    @property
    def warnings(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if not o.passed and o.severity == "WARN"]


def run_embedding_checks(
    settings: Settings,
    *,
    defs: dg.Definitions | None = None,
    instance: dg.DagsterInstance | None = None,
    tables: Iterable[str] | None = None,
    trigger: str = "cli",
) -> CheckRun:
    """Execute the checks of the embedding assets (no materialization) in one run of the
    `run_checks` job recorded on `instance` (default: DAGSTER_HOME's), so the results show
    in the UI too."""
    defs = defs or build_definitions(settings)
    keys = list(tables) if tables else list(settings.tables)
    asset_keys = {dg.AssetKey(settings.tables[key].asset_name) for key in keys}
    check_keys = sorted(
        (
            k
            for c in defs.asset_checks or []
            if isinstance(c, dg.AssetChecksDefinition)
            for k in c.check_keys
            if k.asset_key in asset_keys
        ),
        key=str,
    )
    started = time.monotonic()
    result = _execute(
        defs,
        RUN_CHECKS,
        instance or dg.DagsterInstance.get(),
        tags=run_tags(trigger, keys),
        check_selection=check_keys,
        # the summary reports every outcome; the console shows only what would be lost
        log_level="CRITICAL",
    )
    outcomes = [
        CheckOutcome(
            asset=e.asset_key.to_user_string(),
            check=e.check_name,
            passed=e.passed,
            severity=e.severity.value,
            description=e.description or "",
            metadata={k: v.value for k, v in e.metadata.items()},
        )
        for e in result.get_asset_check_evaluations()
    ]
    evaluated = {(o.asset, o.check) for o in outcomes}
    failures = {
        e.step_key: _step_error(e.step_failure_data.error)
        for e in result.all_events
        if e.is_step_failure and e.step_key
    }
    steps = {
        dg.AssetKey(spec.asset_name): checks_step_name(spec) for spec in settings.tables.values()
    }
    for check_key in check_keys:
        asset = check_key.asset_key.to_user_string()
        if (asset, check_key.name) not in evaluated:
            error = failures.get(steps.get(check_key.asset_key, ""), "")
            outcomes.append(
                CheckOutcome(
                    asset=asset,
                    check=check_key.name,
                    passed=False,
                    severity="ERROR",
                    description=_no_result(error, check_key.name),
                )
            )
    order = {name: i for i, name in enumerate(CHECK_NAMES)}
    outcomes.sort(key=lambda o: (o.asset, order.get(o.check, len(order))))
    return CheckRun(run_id=result.run_id, seconds=time.monotonic() - started, outcomes=outcomes)


def _step_error(error: SerializableErrorInfo | None) -> str:
    """What a step raised: the checks' own `CheckRaised` where Dagster wrapped it."""
    found = error
    while found is not None and found.cls_name != CheckRaised.__name__:
        found = found.cause
    chosen = found or error
    return chosen.message.strip() if chosen is not None else ""


def _no_result(step_error: str, check: str) -> str:
    """Why a selected check has no result: what its step raised (for this check, when the
    step names several), else a pointer to the run."""
    if not step_error:
        return "no result (see the run in the Dagster UI)"
    line = step_error.splitlines()[0]
    _, _, reasons = line.partition("no result, the check raised: ")
    mine = [r for r in reasons.split("; ") if r.startswith(f"{check}: ")]
    if mine:
        return f"no result, the check raised: {mine[0].removeprefix(f'{check}: ')}"
    return f"no result, the check step failed: {line}"


def summary_lines(run: CheckRun) -> list[str]:
    """A table of every check with its key figure, for the demo and the CLI."""
    lines = [f"asset checks (run {run.run_id[:8]}, {run.seconds:.1f}s):"]
    for o in run.outcomes:
        status = "passed" if o.passed else f"FAILED {o.severity}"
        lines.append(f"  {o.asset:<19} {o.check:<24} {status:<13} {o.description}")
    return lines
