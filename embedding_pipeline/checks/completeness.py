"""Completeness and freshness: no missing, stale or failed embeddings, and the lag of
the oldest row waiting for one."""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dagster as dg

from embedding_pipeline.checks.base import (
    ERROR,
    WARN,
    CheckScope,
    CheckTarget,
    EmbeddingCheck,
    declare_check,
    id_list,
)
from embedding_pipeline.lib import quality
from embedding_pipeline.lib.engine import row_errors
from embedding_pipeline.lib.quality.backlog import BacklogRow, table_pending
from embedding_pipeline.lib.store.db import database_now
from embedding_pipeline.partitions import partition_mapper

NO_MISSING = "no_missing_embeddings"
NO_STALE = "no_stale_embeddings"
NO_FAILED = "no_failed_rows"
LAG = "embedding_lag"


def no_missing_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg
    overdue = cfg.freshness_warn_minutes

    @declare_check(
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
        "sample_ids": id_list(report.sample_ids),
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

    @declare_check(
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
                "sample_ids": id_list(report.sample_ids),
                "sampled": f"whole table counted; first {cfg.sample_ids} stale ids listed",
            },
        )

    return no_stale


def no_failed_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg

    @declare_check(
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
                "sample_ids": id_list(r.row_id for r in report.samples),
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
    """The embedding lag of one table from its pending rows (`table_pending` of
    `lib/quality/backlog.py`): what the check and the backlog sensor report."""

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

    @declare_check(
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
