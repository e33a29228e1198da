"""Asset checks on every embedding asset: complete, current, well-shaped, indexed, searchable.

Seven checks per embedding asset (see docs/checks.md): no missing and no stale embeddings,
the column's dimension matches the model, an HNSW index that can serve the search exists,
the planner can (and at size does) use it, recall@k against an exact scan, and search
latency. The measuring is in `lib/quality.py`; this module decides pass, severity and
metadata.

The embedding assets are partitioned by month but the checks are not: each looks at the
whole table, because that is what search reads. Dagster runs an asset's checks in every run
that materializes it (each sensor run and each backfill run too), so a run that
embedded its own months can meet rows of months another run has not reached yet. The
missing-embeddings check therefore fails with ERROR (and, being blocking, fails the run and
stops downstream steps) only when rows of the run's own partitions are missing, or when it
runs on its own; rows missing elsewhere in the table are reported with WARN.
"""

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import psycopg

from embedding_pipeline.lib import quality
from embedding_pipeline.lib.engine import errors as row_errors
from embedding_pipeline.lib.schema import hnsw_index_name
from embedding_pipeline.lib.sync import Window
from embedding_pipeline.partitions import monthly_partitions, window_for
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.settings import Settings, TableSpec

NO_MISSING = "no_missing_embeddings"
NO_STALE = "no_stale_embeddings"
DIMENSION = "dimension_matches_model"
INDEX_PRESENT = "hnsw_index_present"
INDEX_USED = "hnsw_index_used"
RECALL = "search_recall"
LATENCY = "search_latency"
NO_FAILED = "no_failed_rows"
CHECK_NAMES = (
    NO_MISSING,
    NO_STALE,
    NO_FAILED,
    DIMENSION,
    INDEX_PRESENT,
    INDEX_USED,
    RECALL,
    LATENCY,
)
#: Checks that cost a few indexed queries whatever the table size: these run with every
#: sensor run. Recall and latency sample many searches (seconds at 100k rows) and run on
#: the checks schedule, from the UI or with `embedding-pipeline check`.
PER_RUN_CHECKS = (NO_MISSING, NO_STALE, NO_FAILED, DIMENSION, INDEX_PRESENT, INDEX_USED)
CHECKS_SCHEDULE = "embedding_checks_schedule"

ERROR = dg.AssetCheckSeverity.ERROR
WARN = dg.AssetCheckSeverity.WARN


def _ids(ids: Iterable[int]) -> dg.MetadataValue:
    return dg.MetadataValue.json(list(ids))


def _size(size_bytes: int) -> str:
    value = float(size_bytes)
    for unit in ("B", "kB", "MB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _run_window(
    context: dg.AssetCheckExecutionContext, partitions_def: dg.TimeWindowPartitionsDefinition
) -> tuple[Window | None, str | None]:
    """The rows the surrounding run materialized, when the check runs in a partitioned run."""
    op_context = context.op_execution_context
    if not (op_context.has_partition_key or op_context.has_partition_key_range):
        return None, None
    keys = op_context.partition_key_range
    label = keys.start if keys.start == keys.end else f"{keys.start}..{keys.end}"
    return window_for(partitions_def, op_context.partition_time_window), label


def _measured(fn: Callable[..., dg.AssetCheckResult]) -> Callable[..., dg.AssetCheckResult]:
    """Add the check's own run time to its metadata, and turn a database error into a failed
    ERROR result that names it (search would meet the same error)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> dg.AssetCheckResult:
        started = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except psycopg.Error as exc:
            message = str(exc).strip() or repr(exc)
            result = dg.AssetCheckResult(
                passed=False,
                severity=ERROR,
                description=f"database error: {message.splitlines()[0]}",
                metadata={"error": message, "error_type": type(exc).__name__},
            )
        return dg.AssetCheckResult(
            passed=result.passed,
            severity=result.severity,
            description=result.description,
            metadata={**result.metadata, "check_seconds": round(time.perf_counter() - started, 3)},
        )

    return wrapper


def build_embedding_checks(spec: TableSpec, settings: Settings) -> list[dg.AssetChecksDefinition]:
    """The seven checks of one embedding asset, configured by `settings.checks`."""
    asset = dg.AssetKey(spec.asset_name)
    partitions_def = monthly_partitions(settings.partition_start)
    cfg = settings.checks
    ef_search = settings.hnsw.ef_search
    expected_index = hnsw_index_name(spec)
    where = f"`{spec.table}.{spec.embedding_column}`"

    @dg.asset_check(
        asset=asset,
        name=NO_MISSING,
        blocking=True,
        description=f"No row of `{spec.table}` lacks an embedding: such rows are invisible to "
        "search. ERROR; inside a partitioned run, rows of other partitions only WARN.",
    )
    @_measured
    def no_missing(
        context: dg.AssetCheckExecutionContext,
        postgres: PostgresResource,
        embedder: EmbedderResource,
    ) -> dg.AssetCheckResult:
        window, label = _run_window(context, partitions_def)
        with postgres.connection(vector=False) as conn:
            report = quality.count_missing(
                conn, spec, sample_ids=cfg.sample_ids, model_id=embedder.model_id, window=window
            )
        metadata: dict[str, Any] = {
            "missing": report.missing,
            "missing_pending": report.pending,
            "missing_failed": report.failed,
            "rows": report.rows,
            "sample_ids": _ids(report.sample_ids),
            "sampled": f"whole table counted; first {cfg.sample_ids} missing ids listed",
        }
        severity = ERROR
        description = f"missing {report.missing} of {report.rows} rows"
        if report.failed:
            description += f" ({report.pending} pending, {report.failed} failed: no_failed_rows)"
        if not report.pending:
            # only refused rows: the errors table and no_failed_rows own them
            severity = WARN
        if label is not None:
            metadata["run_partitions"] = label
            metadata["missing_in_run_partitions"] = report.missing_in_window or 0
            if not report.ok and not report.pending_in_window:
                severity = WARN
                description += f" (none pending in this run's partitions {label})"
        if report.sample_ids:
            description += ": ids " + ", ".join(str(i) for i in report.sample_ids)
        return dg.AssetCheckResult(
            passed=report.ok, severity=severity, description=description, metadata=metadata
        )

    @dg.asset_check(
        asset=asset,
        name=NO_STALE,
        description=f"No embedding of `{spec.table}` was made from other text or by another "
        "model than the configured one. WARN: search still works, on old meaning.",
    )
    @_measured
    def no_stale(postgres: PostgresResource, embedder: EmbedderResource) -> dg.AssetCheckResult:
        model_id = embedder.model_id
        with postgres.connection(vector=False) as conn:
            report = quality.count_stale(conn, spec, model_id=model_id, sample_ids=cfg.sample_ids)
        description = f"stale {report.stale} of {report.embedded} embedded rows"
        if report.stale:
            description += (
                f" ({report.text_changed} text changed, {report.other_model} "
                f"other model): ids " + ", ".join(str(i) for i in report.sample_ids)
            )
        if report.untracked:
            description += (
                f"; {report.untracked} of {report.tracking_sampled} sampled rows changed "
                "without the tracking trigger (disabled triggers or replica mode?): run "
                "`embedding-pipeline schema` to re-hash them"
            )
        return dg.AssetCheckResult(
            passed=report.ok,
            severity=WARN,
            description=description,
            metadata={
                "stale": report.stale,
                "embedded": report.embedded,
                "rows": report.rows,
                "stale_text_changed": report.text_changed,
                "stale_other_model": report.other_model,
                "tracking_sampled": report.tracking_sampled,
                "untracked_rows_in_sample": report.untracked,
                "model": model_id,
                "sample_ids": _ids(report.sample_ids),
                "sampled": f"whole table counted; first {cfg.sample_ids} stale ids listed",
            },
        )

    @dg.asset_check(
        asset=asset,
        name=NO_FAILED,
        description=f"No row of `{spec.table}` is recorded as refused by the provider. WARN: "
        "such rows are skipped until they are due again, their text changes, or "
        "`embedding-pipeline errors retry` resets them.",
    )
    @_measured
    def no_failed(postgres: PostgresResource, embedder: EmbedderResource) -> dg.AssetCheckResult:
        model_id = embedder.model_id
        with postgres.connection(vector=False) as conn:
            report = row_errors.failed_rows(conn, spec, model_id, sample=cfg.sample_ids)
        description = f"failed {report.total} rows"
        if report.total:
            description += (
                f" ({report.given_up} given up, {report.retrying} to be tried again): "
                + "; ".join(f"id {r.row_id}: {r.message[:120]}" for r in report.samples[:3])
            )
        return dg.AssetCheckResult(
            passed=report.total == 0,
            severity=WARN,
            description=description,
            metadata={
                "failed": report.total,
                "given_up": report.given_up,
                "retrying": report.retrying,
                "model": model_id,
                "sample_ids": _ids(r.row_id for r in report.samples),
                "samples": dg.MetadataValue.json(
                    [
                        {
                            "id": r.row_id,
                            "reason": r.message,
                            "error_class": r.error_class,
                            "attempts": r.attempts,
                        }
                        for r in report.samples
                    ]
                ),
                "repair": "embedding-pipeline errors list / errors retry --all",
            },
        )

    @dg.asset_check(
        asset=asset,
        name=DIMENSION,
        blocking=True,
        description=f"{where} is declared with the configured model's dimension and stored "
        "vectors have it. ERROR: otherwise no query vector can be compared.",
    )
    @_measured
    def dimension(postgres: PostgresResource, embedder: EmbedderResource) -> dg.AssetCheckResult:
        expected = embedder.dimension
        with postgres.connection(vector=False) as conn:
            report = quality.check_dimension(
                conn,
                spec,
                expected=expected,
                sample_size=cfg.dimension_sample_size,
                sample_ids=cfg.sample_ids,
            )
        if report.column_type is None:
            description = f"{where} does not exist"
        elif report.declared is None and not report.dimensions_found:
            description = f"{where} is {report.column_type}, not vector({expected})"
        else:
            description = (
                f"{report.column_type} vs model {expected}; {report.sampled} stored vectors sampled"
            )
            wrong = {d: n for d, n in report.dimensions_found.items() if d != expected}
            if wrong:
                description += f", {sum(wrong.values())} of another length: ids " + ", ".join(
                    str(i) for i in report.mismatched_ids
                )
        return dg.AssetCheckResult(
            passed=report.ok,
            severity=ERROR,
            description=description,
            metadata={
                "column_type": report.column_type or "missing",
                "declared_dimension": report.declared if report.declared is not None else 0,
                "model_dimension": expected,
                "stored_dimensions": dg.MetadataValue.json(
                    {str(d): n for d, n in sorted(report.dimensions_found.items())}
                ),
                "mismatched_ids": _ids(report.mismatched_ids),
                "sampled": f"first {report.sampled} non-NULL vectors "
                f"(limit {cfg.dimension_sample_size})",
            },
        )

    @dg.asset_check(
        asset=asset,
        name=INDEX_PRESENT,
        blocking=True,
        description=f"A valid HNSW index with `{quality.EXPECTED_OPCLASS}` exists on {where}. "
        "ERROR: without it every search is a sequential scan.",
    )
    @_measured
    def index_present(postgres: PostgresResource) -> dg.AssetCheckResult:
        with postgres.connection(vector=False) as conn:
            report = quality.find_hnsw_indexes(conn, spec, expected_index)
        found = [f"{i.name} ({i.opclass}{'' if i.valid else ', invalid'})" for i in report.indexes]
        metadata: dict[str, Any] = {
            "expected_opclass": report.expected_opclass,
            "hnsw_indexes": dg.MetadataValue.json(
                [
                    {
                        "name": i.name,
                        "opclass": i.opclass,
                        "m": i.m,
                        "ef_construction": i.ef_construction,
                        "size_bytes": i.size_bytes,
                        "valid": i.valid,
                        "definition": i.definition,
                    }
                    for i in report.indexes
                ]
            ),
            "configured_m": settings.hnsw.m,
            "configured_ef_construction": settings.hnsw.ef_construction,
        }
        usable = report.usable
        if usable is None:
            description = (
                f"no valid HNSW index with {report.expected_opclass} on {where} "
                "(search orders by <=>)"
            )
            description += f"; found {', '.join(found)}" if found else "; no HNSW index at all"
            return dg.AssetCheckResult(
                passed=False, severity=ERROR, description=description, metadata=metadata
            )
        metadata.update(
            {
                "index_name": usable.name,
                "opclass": usable.opclass,
                "m": usable.m,
                "ef_construction": usable.ef_construction,
                "size_bytes": usable.size_bytes,
                "size": _size(usable.size_bytes),
                "definition": usable.definition,
            }
        )
        return dg.AssetCheckResult(
            passed=True,
            severity=ERROR,
            metadata=metadata,
            description=f"{usable.name}: {usable.opclass}, m={usable.m}, "
            f"ef_construction={usable.ef_construction}, {_size(usable.size_bytes)}",
        )

    @dg.asset_check(
        asset=asset,
        name=INDEX_USED,
        blocking=True,
        description="EXPLAIN of the search statement: ERROR if the HNSW index cannot serve it "
        "even with sequential scans off; WARN if the planner does not choose it by "
        f"default on a table of {cfg.planner_warn_rows} rows or more.",
    )
    @_measured
    def index_used(postgres: PostgresResource, embedder: EmbedderResource) -> dg.AssetCheckResult:
        with postgres.connection() as conn:
            usable = quality.find_hnsw_indexes(conn, spec, expected_index).usable
            report = quality.check_index_use(
                conn,
                spec,
                usable.name if usable else None,
                dimension=embedder.dimension,
                k=cfg.k,
                ef_search=ef_search,
            )
        default_scan = (
            "a sequential scan" if "Seq Scan" in report.default_outline else report.default_outline
        )
        if report.chosen_by_default:
            planner = f"chosen by the planner at {report.rows} rows"
        else:
            planner = (
                f"the planner prefers {default_scan} at {report.rows} rows "
                f"(normal below ~{cfg.planner_warn_rows})"
            )
        metadata: dict[str, Any] = {
            "index_name": report.index_name or "none",
            "can_serve": report.can_serve,
            "chosen_by_default": report.chosen_by_default,
            "rows": report.rows,
            "planner_warn_rows": cfg.planner_warn_rows,
            "ef_search": report.ef_search,
            "k": report.k,
            "default_plan_outline": report.default_outline,
            "forced_plan_outline": report.forced_outline,
            "default_plan": dg.MetadataValue.json(report.default_plan),
            "forced_plan": dg.MetadataValue.json(report.forced_plan),
        }
        if not report.can_serve:
            return dg.AssetCheckResult(
                passed=False,
                severity=ERROR,
                metadata=metadata,
                description=(
                    "no usable HNSW index: even with sequential scans off the plan is "
                    f"{report.forced_outline}"
                ),
            )
        description = f"index used: yes; {planner}"
        if not report.chosen_by_default and report.rows >= cfg.planner_warn_rows:
            return dg.AssetCheckResult(
                passed=False,
                severity=WARN,
                metadata=metadata,
                description=(
                    f"index usable but not chosen: the planner runs {default_scan} on "
                    f"{report.rows} rows (warns from {cfg.planner_warn_rows})"
                ),
            )
        return dg.AssetCheckResult(
            passed=True, severity=ERROR, metadata=metadata, description=description
        )

    @dg.asset_check(
        asset=asset,
        name=RECALL,
        description=f"recall@{cfg.k} of the HNSW search against an exact scan in the same "
        f"snapshot, over up to {cfg.recall_sample_size} stored vectors; WARN "
        f"below {cfg.recall_threshold}.",
    )
    @_measured
    def recall(postgres: PostgresResource) -> dg.AssetCheckResult:
        with postgres.connection() as conn:
            usable = quality.find_hnsw_indexes(conn, spec, expected_index).usable
            report = quality.measure_recall(
                conn,
                spec,
                usable.name if usable else None,
                k=cfg.k,
                sample_size=cfg.recall_sample_size,
                ef_search=ef_search,
            )
        metadata: dict[str, Any] = {
            "recall": round(report.recall, 4) if report.recall is not None else "n/a",
            "threshold": cfg.recall_threshold,
            "k": cfg.k,
            "ef_search": ef_search,
            "queries": report.queries,
            "min_query_recall": round(report.min_query_recall, 4)
            if report.min_query_recall is not None
            else "n/a",
            "worst_query_ids": _ids(report.worst_query_ids),
            "sampled": report.sample_method,
            "hnsw_plan": report.hnsw_plan,
            "exact_plan": report.exact_plan,
        }
        if report.recall is None:
            return dg.AssetCheckResult(
                passed=True,
                severity=WARN,
                metadata=metadata,
                description="no stored vectors to measure recall with",
            )
        if not report.index_used or not report.exact_is_sequential:
            return dg.AssetCheckResult(
                passed=False,
                severity=WARN,
                metadata=metadata,
                description=(
                    f"recall not measurable: HNSW plan {report.hnsw_plan!r}, exact plan "
                    f"{report.exact_plan!r}"
                ),
            )
        description = (
            f"recall@{cfg.k} {report.recall:.3f} over {report.queries} queries "
            f"(ef_search {ef_search}, threshold {cfg.recall_threshold})"
        )
        return dg.AssetCheckResult(
            passed=report.recall >= cfg.recall_threshold,
            severity=WARN,
            metadata=metadata,
            description=description,
        )

    @dg.asset_check(
        asset=asset,
        name=LATENCY,
        description=f"p50/p95 of the search statement over up to {cfg.latency_sample_size} "
        f"queries; WARN when p95 exceeds {cfg.latency_warn_ms} ms.",
    )
    @_measured
    def latency(postgres: PostgresResource) -> dg.AssetCheckResult:
        with postgres.connection() as conn:
            report = quality.measure_latency(
                conn, spec, k=cfg.k, sample_size=cfg.latency_sample_size, ef_search=ef_search
            )
        if report.p95_ms is None or report.p50_ms is None or report.max_ms is None:
            return dg.AssetCheckResult(
                passed=True,
                severity=WARN,
                description="no stored vectors to query with",
                metadata={"queries": 0, "sampled": report.sample_method},
            )
        return dg.AssetCheckResult(
            passed=report.p95_ms <= cfg.latency_warn_ms,
            severity=WARN,
            description=f"p95 {report.p95_ms:.1f} ms, p50 {report.p50_ms:.1f} ms over "
            f"{report.queries} queries (warn above {cfg.latency_warn_ms} ms)",
            metadata={
                "p50_ms": round(report.p50_ms, 3),
                "p95_ms": round(report.p95_ms, 3),
                "max_ms": round(report.max_ms, 3),
                "queries": report.queries,
                "warn_ms": cfg.latency_warn_ms,
                "k": cfg.k,
                "ef_search": ef_search,
                "plan": report.plan,
                "sampled": report.sample_method,
            },
        )

    return [no_missing, no_stale, no_failed, dimension, index_present, index_used, recall, latency]


def build_checks(settings: Settings) -> list[dg.AssetChecksDefinition]:
    """Every embedding asset's checks, for `build_definitions`."""
    return [
        check
        for spec in settings.tables.values()
        for check in build_embedding_checks(spec, settings)
    ]


def per_run_check_keys(asset_keys: Iterable[dg.AssetKey]) -> list[dg.AssetCheckKey]:
    """The cheap checks of `asset_keys`, for runs that materialize them often."""
    return [dg.AssetCheckKey(key, name) for key in asset_keys for name in PER_RUN_CHECKS]


def build_checks_schedule(settings: Settings) -> dg.ScheduleDefinition:
    """Every check of every embedding asset, on `settings.checks.schedule_cron` (UTC)."""
    asset_keys = [dg.AssetKey(spec.asset_name) for spec in settings.tables.values()]
    return dg.ScheduleDefinition(
        name=CHECKS_SCHEDULE,
        cron_schedule=settings.checks.schedule_cron,
        execution_timezone="UTC",
        target=dg.AssetSelection.checks_for_assets(*asset_keys),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="All seven checks of each embedding asset, recall and latency included "
        "(sensor runs carry only the cheap ones).",
    )


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


#: The summary reports every outcome; the console shows only what would otherwise be lost.
_QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def run_embedding_checks(
    settings: Settings,
    *,
    defs: dg.Definitions | None = None,
    instance: dg.DagsterInstance | None = None,
    tables: Iterable[str] | None = None,
) -> CheckRun:
    """Execute the checks of the embedding assets (no materialization) in one run recorded
    on `instance` (default: DAGSTER_HOME's), so the results show in the UI too."""
    if defs is None:
        from embedding_pipeline.definitions import build_definitions

        defs = build_definitions(settings)
    keys = list(tables) if tables else list(settings.tables)
    asset_keys = {dg.AssetKey(settings.tables[key].asset_name) for key in keys}
    assets = [defs.get_assets_def(key) for key in sorted(asset_keys)]
    checks = [
        c
        for c in defs.asset_checks or []
        if isinstance(c, dg.AssetChecksDefinition)
        and any(k.asset_key in asset_keys for k in c.check_keys)
    ]
    started = time.monotonic()
    result = dg.materialize(
        [*assets, *checks],
        selection=dg.AssetSelection.checks_for_assets(*assets),
        resources=defs.resources,
        instance=instance or dg.DagsterInstance.get(),
        raise_on_error=False,
        run_config=_QUIET,
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
        e.step_key: e.step_failure_data.error.message.strip() if e.step_failure_data.error else ""
        for e in result.all_events
        if e.is_step_failure and e.step_key
    }
    for check_key in sorted(
        {k for c in checks for k in c.check_keys if k.asset_key in asset_keys}, key=str
    ):
        asset = check_key.asset_key.to_user_string()
        if (asset, check_key.name) not in evaluated:
            error = failures.get(f"{asset}_{check_key.name}", "")
            outcomes.append(
                CheckOutcome(
                    asset=asset,
                    check=check_key.name,
                    passed=False,
                    severity="ERROR",
                    description=f"no result, the check raised: {error.splitlines()[0]}"
                    if error
                    else "no result (see the run in the Dagster UI)",
                )
            )
    order = {name: i for i, name in enumerate(CHECK_NAMES)}
    outcomes.sort(key=lambda o: (o.asset, order.get(o.check, len(order))))
    return CheckRun(run_id=result.run_id, seconds=time.monotonic() - started, outcomes=outcomes)


def summary_lines(run: CheckRun) -> list[str]:
    """A table of every check with its key figure, for the demo and the CLI."""
    lines = [f"asset checks (run {run.run_id[:8]}, {run.seconds:.1f}s):"]
    for o in run.outcomes:
        status = "passed" if o.passed else f"FAILED {o.severity}"
        lines.append(f"  {o.asset:<19} {o.check:<24} {status:<13} {o.description}")
    return lines
