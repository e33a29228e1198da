"""Asset checks on every embedding asset: complete, current, fresh, well-shaped, indexed,
searchable.

Nine checks per embedding asset (see docs/checks.md), one builder function each, listed in
`CHECK_BUILDERS`: no missing, no stale and no failed embeddings, the embedding lag (age of
the oldest row waiting), the column's dimension matches the model, an HNSW index that can
serve the search exists, the planner can (and at size does) use it, recall@k against an
exact scan, and search latency. The measuring is in `lib/quality/`;
this module decides pass, severity and metadata. An asset's checks run as one step (a
`multi_asset_check`) on one connection: a run pays Dagster's step overhead once, not once
per check, and each check keeps its own name, blocking flag, description and result.

The embedding assets are partitioned by month but the checks are not: each looks at the
whole table, because that is what search reads. Dagster runs an asset's checks in every run
that materializes it (each sensor run and each backfill run too), so a run that
embedded its own months can meet rows of months another run has not reached yet. The
missing-embeddings check therefore fails with ERROR (and, being blocking, fails the run and
stops downstream steps) only when rows of the run's own partitions are missing, or when it
runs on its own; rows missing elsewhere in the table are reported with WARN.
"""

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dagster as dg
import psycopg

from embedding_pipeline.assets.embeddings import START_SNAPSHOT_KEY
from embedding_pipeline.jobs import MATERIALIZE_ALL, RUN_CHECKS, run_tags
from embedding_pipeline.lib import quality
from embedding_pipeline.lib.engine import row_errors
from embedding_pipeline.lib.quality.backlog import BacklogRow, table_pending
from embedding_pipeline.lib.store.db import database_now
from embedding_pipeline.lib.store.domain import Window
from embedding_pipeline.lib.store.hnsw import hnsw_index_name
from embedding_pipeline.partitions import monthly_partitions, partition_mapper, window_for
from embedding_pipeline.resources import EmbedderResource, PostgresResource
from embedding_pipeline.settings import CheckSettings, Settings, TableSpec

NO_MISSING = "no_missing_embeddings"
NO_STALE = "no_stale_embeddings"
DIMENSION = "dimension_matches_model"
INDEX_PRESENT = "hnsw_index_present"
INDEX_USED = "hnsw_index_used"
RECALL = "search_recall"
LATENCY = "search_latency"
NO_FAILED = "no_failed_rows"
LAG = "embedding_lag"
CHECK_NAMES = (
    NO_MISSING,
    NO_STALE,
    NO_FAILED,
    LAG,
    DIMENSION,
    INDEX_PRESENT,
    INDEX_USED,
    RECALL,
    LATENCY,
)
#: The checks every embedding run carries: all nine, so that after any run every badge
#: describes the vectors it left (a check not run would show "not evaluated" against the
#: new materialization). Inside a run, recall and latency sample fewer queries
#: (`run_recall_sample_size`, `run_latency_sample_size`); the checks schedule and
#: `embedding-pipeline check` take the full samples.
PER_RUN_CHECKS = CHECK_NAMES
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


@dataclass(frozen=True)
class CheckTarget:
    """What every check of one embedding asset needs to know."""

    spec: TableSpec
    settings: Settings

    @property
    def asset(self) -> dg.AssetKey:
        return dg.AssetKey(self.spec.asset_name)

    @property
    def partitions_def(self) -> dg.TimeWindowPartitionsDefinition:
        return monthly_partitions(self.settings.partition_start)

    @property
    def cfg(self) -> CheckSettings:
        return self.settings.checks

    @property
    def ef_search(self) -> int:
        return self.settings.hnsw.ef_search

    @property
    def expected_index(self) -> str:
        return hnsw_index_name(self.spec)

    @property
    def where(self) -> str:
        return f"`{self.spec.table}.{self.spec.embedding_column}`"

    def usable_index(self, conn: psycopg.Connection) -> str | None:
        """The name of the valid HNSW index search can use, if there is one."""
        usable = quality.find_hnsw_indexes(conn, self.spec, self.expected_index).usable
        return usable.name if usable else None


class CheckScope:
    """What the checks of one asset share in one step: the resources, the months of the
    surrounding run (when it materialized the asset), and one database connection,
    opened on first use and opened again when a check lost it."""

    def __init__(
        self,
        context: dg.AssetCheckExecutionContext,
        postgres: PostgresResource,
        embedder: EmbedderResource,
        partitions_def: dg.TimeWindowPartitionsDefinition,
    ) -> None:
        self.context = context
        self.postgres = postgres
        self.embedder = embedder
        self.window, self.run_label = _run_window(context, partitions_def)
        self._conn: psycopg.Connection | None = None

    @property
    def run_samples(self) -> bool:
        """Recall and latency take the run's smaller samples: the checks run inside an
        embedding run (one that materialized months of the asset, or a `materialize_all`
        run, which runs every table's checks whether or not it had work for the table).
        The checks schedule, `embedding-pipeline check` and the UI's "Execute" take the
        full samples."""
        return self.window is not None or self.context.run.job_name == MATERIALIZE_ALL

    @property
    def conn(self) -> psycopg.Connection:
        """The shared connection (pgvector types registered), idle between checks."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self.close()
            self._conn = self.postgres.connect()
        return self._conn

    def release(self) -> None:
        """End whatever transaction a check left open, so the next one starts idle."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def start_snapshot(self, asset: dg.AssetKey) -> str | None:
        """The start snapshot the asset's embedding step recorded in this run, if it ran."""
        if self.window is None:
            return None
        context = self.context
        records = context.instance.get_records_for_run(
            context.run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=1000
        ).records
        for record in records:
            event = record.event_log_entry.dagster_event
            materialization = event.step_materialization_data.materialization if event else None
            if materialization is None or materialization.asset_key != asset:
                continue
            details = materialization.metadata.get("run_details")
            value = getattr(details, "value", None)
            if isinstance(value, dict) and value.get(START_SNAPSHOT_KEY):
                return str(value[START_SNAPSHOT_KEY])
        return None


@dataclass(frozen=True)
class EmbeddingCheck:
    """One check of an embedding asset: its spec (name, blocking, description) and the
    function that measures it and decides pass, severity and metadata."""

    spec: dg.AssetCheckSpec
    evaluate: Callable[[CheckScope], dg.AssetCheckResult]

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, scope: CheckScope) -> dg.AssetCheckResult:
        """The result for the step to yield: the check's own run time in its metadata, and
        a database error as a failed ERROR result that names it (search would meet the
        same error). The connection is left idle for the next check."""
        started = time.perf_counter()
        try:
            result = self.evaluate(scope)
        except psycopg.Error as exc:
            message = str(exc).strip() or repr(exc)
            result = dg.AssetCheckResult(
                passed=False,
                severity=ERROR,
                description=f"database error: {message.splitlines()[0]}",
                metadata={"error": message, "error_type": type(exc).__name__},
            )
        finally:
            scope.release()
        return dg.AssetCheckResult(
            asset_key=self.spec.asset_key,
            check_name=self.name,
            passed=result.passed,
            severity=result.severity,
            description=result.description,
            metadata={**result.metadata, "check_seconds": round(time.perf_counter() - started, 3)},
        )


def _check(
    t: CheckTarget, name: str, *, description: str, blocking: bool = False
) -> Callable[[Callable[[CheckScope], dg.AssetCheckResult]], EmbeddingCheck]:
    """Declare the decorated function as the check `name` of `t`'s asset."""

    def declare(fn: Callable[[CheckScope], dg.AssetCheckResult]) -> EmbeddingCheck:
        spec = dg.AssetCheckSpec(name, asset=t.asset, blocking=blocking, description=description)
        return EmbeddingCheck(spec=spec, evaluate=fn)

    return declare


class CheckRaised(RuntimeError):
    """A check raised (not a database error, which is a failed result): the step fails
    after the other checks' results, naming it."""


def no_missing_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg
    overdue = cfg.freshness_warn_minutes

    @_check(
        t,
        NO_MISSING,
        blocking=True,
        description=f"No row of `{spec.table}` lacks an embedding it should have by now: such "
        "rows are invisible to search. In a run, ERROR when rows of the run's months that "
        "existed when it started are still missing (the run's own work); alone, ERROR when "
        f"rows have waited over {overdue:g} min and no run is embedding them. Rows another "
        "run holds, rows written during the run and refused rows (no_failed_rows) are "
        "reported, never failed; rows whose text is empty (nothing to embed, so search "
        "cannot find them) WARN.",
    )
    def no_missing(s: CheckScope) -> dg.AssetCheckResult:
        report = quality.count_missing(
            s.conn,
            spec,
            sample_ids=cfg.sample_ids,
            model_id=s.embedder.model_id,
            overdue_minutes=overdue,
            window=s.window,
            start_snapshot=s.start_snapshot(t.asset),
        )
        return missing_outcome(report, s.run_label if report.in_run else None, overdue)

    return no_missing


def missing_outcome(
    report: quality.MissingReport, run_partitions: str | None, overdue_minutes: float
) -> dg.AssetCheckResult:
    """Pass, WARN or ERROR for a `MissingReport` (see `no_missing_check`)."""
    metadata: dict[str, Any] = {
        "missing": report.missing,
        "missing_pending": report.pending,
        "missing_overdue": report.overdue,
        "missing_claimed_by_another_run": report.claimed,
        "missing_failed": report.failed,
        "missing_empty_text": report.empty,
        "rows": report.rows,
        "sample_ids": _ids(report.sample_ids),
        "claimed_by": dg.MetadataValue.json(report.claimed_by),
    }
    notes = []
    if report.claimed:
        notes.append(
            f"{report.claimed} being embedded by another run ({', '.join(report.claimed_by)})"
        )
    if report.failed:
        notes.append(f"{report.failed} refused by the provider (no_failed_rows)")
    if report.empty:
        notes.append(f"{report.empty} with empty text (nothing to embed, not searchable)")
    ids = f": ids {', '.join(str(i) for i in report.sample_ids)}" if report.sample_ids else ""

    def failed(description: str) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(
            passed=False, severity=ERROR, metadata=metadata, description=description
        )

    if run_partitions is not None:
        metadata.update(
            {
                "run_partitions": run_partitions,
                "missing_owed_by_run": report.owed,
                "missing_written_during_run": report.new_in_run,
                "missing_in_run_partitions": report.pending_in_run,
            }
        )
        if report.new_in_run:
            notes.insert(0, f"{report.new_in_run} written after this run started (the next run's)")
        if report.owed:
            return failed(
                f"{report.owed} rows of this run's months {run_partitions} that existed when "
                f"it started are still missing{ids}"
            )
        elsewhere = report.pending - report.pending_in_run
        if elsewhere:
            notes.append(f"{elsewhere} pending in other months")
        head = f"none missing that this run ({run_partitions}) should have embedded"
    else:
        if report.overdue:
            return failed(
                f"{report.overdue} rows have waited over {overdue_minutes:g} min for an "
                f"embedding and no run is embedding them{ids}"
            )
        waiting = report.pending - report.claimed
        if waiting:
            notes.insert(0, f"{waiting} waiting less than {overdue_minutes:g} min for a run")
        head = f"missing {report.missing} of {report.rows} rows"
    overdue = run_partitions is not None and report.overdue > 0
    if overdue:
        notes.append(
            f"{report.overdue} waited over {overdue_minutes:g} min and no run is embedding them"
        )
    # empty texts are no fault of the pipeline, but rows search cannot find: a warning
    return dg.AssetCheckResult(
        passed=not (overdue or report.empty),
        severity=WARN,
        metadata=metadata,
        description=head
        + (f" ({'; '.join(notes)})" if notes else "")
        + (ids if report.pending and overdue else ""),
    )


def no_stale_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg

    @_check(
        t,
        NO_STALE,
        description=f"No embedding of `{spec.table}` was made from other text or by another "
        "model than the configured one. WARN: search still works, on old meaning.",
    )
    def no_stale(s: CheckScope) -> dg.AssetCheckResult:
        model_id = s.embedder.model_id
        report = quality.count_stale(s.conn, spec, model_id=model_id, sample_ids=cfg.sample_ids)
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

    return no_stale


def no_failed_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg

    @_check(
        t,
        NO_FAILED,
        description=f"No row of `{spec.table}` is recorded as refused by the provider. ERROR "
        "(not blocking) when rows are given up: they have no vector, search cannot find "
        "them, and only new text or `embedding-pipeline errors retry` brings them back; "
        "WARN while refused rows still wait for another try. Empty texts are counted apart "
        "(nothing to embed, not a fault).",
    )
    def no_failed(s: CheckScope) -> dg.AssetCheckResult:
        model_id = s.embedder.model_id
        report = row_errors.failed_rows(s.conn, spec, model_id, sample=cfg.sample_ids)
        description = f"failed {report.total} rows"
        if report.total:
            description += (
                f" ({report.given_up} given up without a vector, {report.retrying} to be "
                "tried again): "
                + "; ".join(f"id {r.row_id}: {r.message[:120]}" for r in report.samples[:3])
            )
        if report.empty:
            description += f"; {report.empty} with empty text (nothing to embed)"
        return dg.AssetCheckResult(
            passed=report.total == 0,
            severity=ERROR if report.given_up else WARN,
            description=description,
            metadata={
                "failed": report.total,
                "given_up": report.given_up,
                "retrying": report.retrying,
                "empty_text": report.empty,
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

    return no_failed


@dataclass(frozen=True)
class LagOutcome:
    """The embedding lag of one table from its pending rows (`lib/backlog.table_pending`):
    what the check and the backlog sensor report."""

    passed: bool
    description: str
    metadata: dict[str, Any]


def lag_outcome(rows: Iterable[BacklogRow], now: datetime, warn_minutes: float) -> LagOutcome:
    """Passed while no row due for embedding has waited longer than `warn_minutes` and no
    row was given up (it would wait for ever)."""
    rows = list(rows)
    waiting = [r for r in rows if r.needs_embedding]
    times = [r.oldest_pending for r in waiting if r.oldest_pending is not None]
    oldest = min(times) if times else None
    minutes = max((now - oldest).total_seconds() / 60, 0.0) if oldest else 0.0
    pending = sum(r.needs_embedding for r in waiting)
    by_month = {r.partition: r.needs_embedding for r in waiting}
    given_up = sum(r.given_up for r in rows)
    metadata: dict[str, Any] = {
        "pending_rows": pending,
        "oldest_pending_minutes": round(minutes, 1),
        "warn_minutes": warn_minutes,
        "pending_by_partition": dg.MetadataValue.json(by_month),
        "failed_rows_waiting": sum(r.failed for r in rows),
        "given_up_rows": given_up,
    }
    if oldest is not None:
        metadata["oldest_pending_since"] = dg.MetadataValue.timestamp(oldest)
    gave_up = (
        f"{given_up} rows the provider refused for good will get no embedding until their "
        "text changes or `embedding-pipeline errors retry` (no_failed_rows)"
    )
    if not pending:
        if given_up:
            return LagOutcome(False, f"no row is due, but {gave_up}", metadata)
        return LagOutcome(True, "no row waits for its embedding", metadata)
    months = ", ".join(f"{key}: {n}" for key, n in sorted(by_month.items()))
    description = (
        f"{pending} rows wait for their embedding, the oldest for {minutes:.1f} min "
        f"(warn above {warn_minutes:g}); per month {months}"
    )
    if given_up:
        description += f"; {gave_up}"
    return LagOutcome(minutes <= warn_minutes and not given_up, description, metadata)


def embedding_lag_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    minutes = t.cfg.freshness_warn_minutes
    partitions_def = t.partitions_def

    @_check(
        t,
        LAG,
        description=f"Freshness: how long the oldest row of `{spec.table}` has waited for its "
        f"embedding (since it was inserted, its text changed or its vector was removed: "
        f"`{spec.pending_since_column}`, kept by a trigger). WARN above {minutes:g} minutes; "
        "metadata lists the pending rows per month.",
    )
    def embedding_lag(s: CheckScope) -> dg.AssetCheckResult:
        rows = table_pending(s.conn, spec, s.embedder.model_id, partition_mapper(partitions_def))
        now = database_now(s.conn)
        outcome = lag_outcome(rows, now, minutes)
        return dg.AssetCheckResult(
            passed=outcome.passed,
            severity=WARN,
            description=outcome.description,
            metadata=outcome.metadata,
        )

    return embedding_lag


def dimension_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg
    where = t.where

    @_check(
        t,
        DIMENSION,
        blocking=True,
        description=f"{where} is declared with the configured model's dimension and storage "
        "type (EP_VECTOR_TYPE) and stored vectors have it. ERROR: otherwise no query vector "
        "can be compared.",
    )
    def dimension(s: CheckScope) -> dg.AssetCheckResult:
        expected = s.embedder.dimension
        wanted_type = t.settings.embedder.vector_type
        report = quality.check_dimension(
            s.conn,
            spec,
            expected=expected,
            sample_size=cfg.dimension_sample_size,
            sample_ids=cfg.sample_ids,
        )
        if report.column_type is None:
            description = f"{where} does not exist"
        elif report.declared is None and not report.dimensions_found:
            description = f"{where} is {report.column_type}, not a vector of {expected} dimensions"
        else:
            description = (
                f"{report.column_type} vs model {expected}; {report.sampled} stored vectors sampled"
            )
            wrong = {d: n for d, n in report.dimensions_found.items() if d != expected}
            if wrong:
                description += f", {sum(wrong.values())} of another length: ids " + ", ".join(
                    str(i) for i in report.mismatched_ids
                )
        stored_type = (report.column_type or "").partition("(")[0]
        type_ok = stored_type == wanted_type
        if report.column_type is not None and not type_ok:
            description += f"; EP_VECTOR_TYPE is {wanted_type}"
        return dg.AssetCheckResult(
            passed=report.ok and type_ok,
            severity=ERROR,
            description=description,
            metadata={
                "column_type": report.column_type or "missing",
                "declared_dimension": report.declared if report.declared is not None else 0,
                "model_dimension": expected,
                "vector_type": wanted_type,
                "stored_dimensions": dg.MetadataValue.json(
                    {str(d): n for d, n in sorted(report.dimensions_found.items())}
                ),
                "mismatched_ids": _ids(report.mismatched_ids),
                "sampled": f"first {report.sampled} non-NULL vectors "
                f"(limit {cfg.dimension_sample_size})",
            },
        )

    return dimension


def index_present_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    expected_index = t.expected_index
    where = t.where
    settings = t.settings

    @_check(
        t,
        INDEX_PRESENT,
        blocking=True,
        description=f"A valid HNSW index with `{quality.EXPECTED_OPCLASS}` (on a halfvec "
        f"column `halfvec_cosine_ops`) exists on {where}. "
        "ERROR: without it every search is a sequential scan.",
    )
    def index_present(s: CheckScope) -> dg.AssetCheckResult:
        report = quality.find_hnsw_indexes(s.conn, spec, expected_index)
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
            builds = quality.index_builds(s.conn, spec)
            metadata["built_by"] = dg.MetadataValue.json(builds)
            if builds:
                # another run builds it now: search uses an exact scan until it is done
                description += f"; {'; '.join(builds)}: search scans exactly meanwhile"
            return dg.AssetCheckResult(
                passed=False,
                severity=WARN if builds else ERROR,
                description=description,
                metadata=metadata,
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

    return index_present


def index_used_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg
    ef_search = t.ef_search

    @_check(
        t,
        INDEX_USED,
        blocking=True,
        description="EXPLAIN of the search statement: ERROR if the HNSW index cannot serve it "
        "even with sequential scans off; WARN if the planner does not choose it by "
        f"default on a table of {cfg.planner_warn_rows} rows or more.",
    )
    def index_used(s: CheckScope) -> dg.AssetCheckResult:
        report = quality.check_index_use(
            s.conn,
            spec,
            t.usable_index(s.conn),
            dimension=s.embedder.dimension,
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
            builds = quality.index_builds(s.conn, spec)
            metadata["built_by"] = dg.MetadataValue.json(builds)
            return dg.AssetCheckResult(
                passed=False,
                severity=WARN if builds else ERROR,
                metadata=metadata,
                description=(
                    "no usable HNSW index: even with sequential scans off the plan is "
                    f"{report.forced_outline}" + (f"; {'; '.join(builds)}" if builds else "")
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

    return index_used


def recall_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg
    ef_search = t.ef_search

    @_check(
        t,
        RECALL,
        description=f"recall@{cfg.k} of the HNSW search against an exact scan in the same "
        f"snapshot, over up to {cfg.recall_sample_size} stored vectors (in an embedding "
        f"run, {cfg.run_recall_sample_size}); WARN below {cfg.recall_threshold}.",
    )
    def recall(s: CheckScope) -> dg.AssetCheckResult:
        report = quality.measure_recall(
            s.conn,
            spec,
            t.usable_index(s.conn),
            k=cfg.k,
            sample_size=cfg.run_recall_sample_size if s.run_samples else cfg.recall_sample_size,
            ef_search=ef_search,
        )
        metadata: dict[str, Any] = {
            "threshold": cfg.recall_threshold,
            "k": cfg.k,
            "ef_search": ef_search,
            "queries": report.queries,
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
        metadata["recall"] = round(report.recall, 4)
        if report.min_query_recall is not None:
            metadata["min_query_recall"] = round(report.min_query_recall, 4)
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

    return recall


def latency_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg
    ef_search = t.ef_search

    @_check(
        t,
        LATENCY,
        description=f"p50/p95 of the search statement over up to {cfg.latency_sample_size} "
        f"queries (in an embedding run, {cfg.run_latency_sample_size}); WARN when p95 "
        f"exceeds {cfg.latency_warn_ms} ms.",
    )
    def latency(s: CheckScope) -> dg.AssetCheckResult:
        sample = cfg.run_latency_sample_size if s.run_samples else cfg.latency_sample_size
        report = quality.measure_latency(
            s.conn, spec, k=cfg.k, sample_size=sample, ef_search=ef_search
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

    return latency


#: One builder per check, in the order the CLI and the docs list them.
CHECK_BUILDERS: tuple[Callable[[CheckTarget], EmbeddingCheck], ...] = (
    no_missing_check,
    no_stale_check,
    no_failed_check,
    embedding_lag_check,
    dimension_check,
    index_present_check,
    index_used_check,
    recall_check,
    latency_check,
)


EVAL = "search_eval"
#: The figures `search_eval` compares with the floors: the modes that depend on the model.
EVAL_FLOOR_MODES = ("vector", "hybrid")


def search_eval_check(t: CheckTarget) -> EmbeddingCheck:
    """Search quality on the labelled questions of EP_EVAL_QUESTIONS for this table, through
    the search API: defined only when that file is configured, and run by the checks
    schedule and `embedding-pipeline check`, never by sensor runs."""
    path = t.cfg.eval_questions
    assert path is not None
    key = next(k for k, s in t.settings.tables.items() if s == t.spec)
    floors = f"recall@5 {t.cfg.eval_min_recall:g}, MRR {t.cfg.eval_min_mrr:g}"

    @_check(
        t,
        EVAL,
        description=f"recall@5, MRR@10 and nDCG@10 of the vector, text and hybrid search "
        f"modes on the {key} questions of {path.name} (EP_EVAL_QUESTIONS). WARN: the vector "
        f"or hybrid mode below {floors} (EP_EVAL_MIN_RECALL, EP_EVAL_MIN_MRR); ERROR: the "
        "questions cannot be scored.",
    )
    def search_eval(s: CheckScope) -> dg.AssetCheckResult:
        import sqlalchemy as sa

        from embedding_pipeline.lib.embedders import EmbeddingError
        from embedding_pipeline.lib.sources.telegram import InputFileError
        from embedding_pipeline.search import Searcher, SearchError, engine_for
        from embedding_pipeline.search.evaluation import MissingRows, evaluate, load_questions

        engine = engine_for(s.postgres.database_url)
        try:
            questions = [q for q in load_questions(path) if q.table == key]
            if not questions:
                return dg.AssetCheckResult(
                    passed=True, description=f"no {key} questions in {path}", metadata={}
                )
            with engine.connect() as conn:
                searcher = Searcher(t.settings, embedder=s.embedder.build())
                result = evaluate(conn, searcher, questions)
        except (InputFileError, MissingRows, SearchError, EmbeddingError, sa.exc.DBAPIError) as exc:
            reason = " ".join(str(exc).split())
            return dg.AssetCheckResult(
                passed=False, severity=ERROR, description=f"cannot score {path}: {reason}"
            )
        finally:
            engine.dispose()
        figures = {mode: result.overall(mode) for mode in result.modes}
        below = [
            f"{mode} {label} {value:.3f} < {floor:g}"
            for mode in EVAL_FLOOR_MODES
            for label, value, floor in (
                ("recall@5", figures[mode].recall, t.cfg.eval_min_recall),
                ("MRR", figures[mode].mrr, t.cfg.eval_min_mrr),
            )
            if value < floor
        ]
        summary = "; ".join(
            f"{m} recall@5 {f.recall:.3f} MRR {f.mrr:.3f} nDCG {f.ndcg:.3f}"
            for m, f in figures.items()
        )
        metadata: dict[str, Any] = {
            "questions": len(questions),
            "questions_file": str(path),
            "model": result.model,
            **{
                f"{mode}_{name}": round(value, 4)
                for mode, f in figures.items()
                for name, value in f.as_dict().items()
            },
        }
        return dg.AssetCheckResult(
            passed=not below,
            severity=WARN,
            description=("below the floor: " + ", ".join(below) + "; " if below else "")
            + f"{summary} ({len(questions)} questions)",
            metadata=metadata,
        )

    return search_eval


def checks_step_name(spec: TableSpec) -> str:
    """The one step (op) that runs the checks of `spec`'s embedding asset."""
    return f"{spec.asset_name}_checks"


def build_embedding_checks(spec: TableSpec, settings: Settings) -> dg.AssetChecksDefinition:
    """The checks of one embedding asset, configured by `settings.checks` (with
    EP_EVAL_QUESTIONS, a tenth: `search_eval`), as one step: the checks a run selects run
    one after another on one connection, so a run pays for one step, not one per check.
    A failed blocking check fails the step once every selected check has its result."""
    target = CheckTarget(spec, settings)
    checks = [build(target) for build in CHECK_BUILDERS]
    if settings.checks.eval_questions is not None:
        checks.append(search_eval_check(target))

    @dg.multi_asset_check(
        name=checks_step_name(spec),
        specs=[check.spec for check in checks],
        can_subset=True,
        description=f"The asset checks of `{spec.asset_name}` (those the run selected), on "
        "one connection.",
    )
    def embedding_checks(
        context: dg.AssetCheckExecutionContext,
        postgres: PostgresResource,
        embedder: EmbedderResource,
    ) -> Iterator[dg.AssetCheckResult]:
        selected = {key.name for key in context.selected_asset_check_keys}
        scope = CheckScope(context, postgres, embedder, target.partitions_def)
        raised: list[tuple[str, Exception]] = []
        try:
            for check in checks:
                if check.name not in selected:
                    continue
                try:
                    result = check.run(scope)
                except Exception as exc:  # a bug in one check must not hide the others
                    raised.append((check.name, exc))
                    continue
                yield result
        finally:
            scope.close()
        if raised:
            reasons = "; ".join(f"{name}: {type(e).__name__}: {e}" for name, e in raised)
            raise CheckRaised(f"no result, the check raised: {reasons}") from raised[0][1]

    return embedding_checks


def build_checks(settings: Settings) -> list[dg.AssetChecksDefinition]:
    """Every embedding asset's checks, for `build_definitions`."""
    return [build_embedding_checks(spec, settings) for spec in settings.tables.values()]


def per_run_check_keys(asset_keys: Iterable[dg.AssetKey]) -> list[dg.AssetCheckKey]:
    """The checks an embedding run of `asset_keys` carries (`PER_RUN_CHECKS`)."""
    return [dg.AssetCheckKey(key, name) for key in asset_keys for name in PER_RUN_CHECKS]


def build_checks_schedule(settings: Settings) -> dg.ScheduleDefinition:
    """Every check of every embedding asset, on `settings.checks.schedule_cron` (UTC)."""
    return dg.ScheduleDefinition(
        name=CHECKS_SCHEDULE,
        cron_schedule=settings.checks.schedule_cron,
        execution_timezone="UTC",
        job_name=RUN_CHECKS,
        tags=run_tags("schedule", settings.tables),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"All {len(CHECK_NAMES)} checks of each embedding asset, recall and "
        "latency on their full samples (embedding runs take smaller ones).",
    )
