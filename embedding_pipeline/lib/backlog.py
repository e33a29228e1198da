"""The backlog: how many rows of each table need embedding, per month partition.

A dry run of a backfill (it replaces the old `backfill_embeddings.py --dry-run`): the
CLI's `embedding-pipeline backlog` prints it and the source assets attach it as
metadata. Nothing is embedded or written.

Two readings: `table_backlog` counts every row of every month (one grouped scan of the
table: for reports), `table_pending` visits only the rows that need embedding, through the
partial pending index (`schema.ensure_pending_index`), so its cost follows the backlog,
not the table (for the backlog sensor's every tick).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from embedding_pipeline.lib.db import needs_embedding_expr
from embedding_pipeline.lib.engine.errors import blocked_expr
from embedding_pipeline.settings import TableSpec


@dataclass(frozen=True)
class BacklogRow:
    """One table's rows in one partition: `missing` have no embedding, `stale` have one
    made from other text or by another model (both due for embedding), `failed` need one
    but their text failed and waits for its next try or for an operator (errors table).
    `rows` is None where only pending rows were visited."""

    table: str
    partition: str
    rows: int | None
    missing: int
    stale: int
    failed: int = 0

    @property
    def needs_embedding(self) -> int:
        return self.missing + self.stale

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "needs_embedding": self.needs_embedding}


def _counts(spec: TableSpec, model_id: str, *, pending_only: bool) -> sql.Composed:
    """(month, rows, missing, stale, failed) grouped by UTC month of the partition column
    (NULL month: no value); `pending_only` reads the pending rows alone."""
    emb = sql.Identifier("t", spec.embedding_column)
    needs = needs_embedding_expr(spec, "t", model_id=model_id)
    blocked = blocked_expr(spec, model_id)
    due = sql.SQL("{} AND NOT {}").format(needs, blocked)
    return sql.SQL(
        "SELECT date_trunc('month', t.{part}, 'UTC') AS month, {rows}, "
        "count(*) FILTER (WHERE {emb} IS NULL AND {due}), "
        "count(*) FILTER (WHERE {emb} IS NOT NULL AND {due}), "
        "count(*) FILTER (WHERE {needs} AND {blocked}) "
        "FROM {table} t {where} GROUP BY 1 ORDER BY 1 NULLS FIRST"
    ).format(
        part=sql.Identifier(spec.partition_column),
        rows=sql.SQL("NULL::bigint") if pending_only else sql.SQL("count(*)"),
        emb=emb,
        due=due,
        needs=needs,
        blocked=blocked,
        table=sql.Identifier(spec.table),
        where=sql.SQL("WHERE {}").format(needs) if pending_only else sql.SQL(""),
    )


def _grouped(
    conn: psycopg.Connection,
    spec: TableSpec,
    query: sql.Composed,
    partition_for: Callable[[datetime | None], str],
) -> list[BacklogRow]:
    merged: dict[str, list[int | None]] = {}
    for month, rows, missing, stale, failed in conn.execute(query):
        counts = merged.setdefault(partition_for(month), [None, 0, 0, 0])
        if rows is not None:
            counts[0] = (counts[0] or 0) + int(rows)
        for i, value in ((1, missing), (2, stale), (3, failed)):
            counts[i] = (counts[i] or 0) + int(value)
    return [
        BacklogRow(
            table=spec.table,
            partition=key,
            rows=c[0],
            missing=c[1] or 0,
            stale=c[2] or 0,
            failed=c[3] or 0,
        )
        for key, c in sorted(merged.items())
    ]


def table_backlog(
    conn: psycopg.Connection,
    spec: TableSpec,
    model_id: str,
    partition_for: Callable[[datetime | None], str],
) -> list[BacklogRow]:
    """Per-partition counts of every row of one table (months mapped to keys by
    `partition_for`)."""
    return _grouped(conn, spec, _counts(spec, model_id, pending_only=False), partition_for)


def table_pending(
    conn: psycopg.Connection,
    spec: TableSpec,
    model_id: str,
    partition_for: Callable[[datetime | None], str],
) -> list[BacklogRow]:
    """Per-partition counts of the rows that need embedding (missing, stale, failed) and
    of nothing else: one pass over the partial pending index, whatever the table size.
    Partitions with nothing pending are absent."""
    return _grouped(conn, spec, _counts(spec, model_id, pending_only=True), partition_for)


def backlog(
    conn: psycopg.Connection,
    specs: Iterable[TableSpec],
    model_id: str,
    partition_for: Callable[[datetime | None], str],
) -> list[BacklogRow]:
    out: list[BacklogRow] = []
    for spec in specs:
        out.extend(table_backlog(conn, spec, model_id, partition_for))
    return out


def pending(rows: Sequence[BacklogRow]) -> list[BacklogRow]:
    """Partitions with rows due for embedding or recorded as failed."""
    return [r for r in rows if r.needs_embedding or r.failed]


def partition_range(rows: Sequence[BacklogRow]) -> tuple[str, str] | None:
    """The first and last partition with work, or None when nothing is pending."""
    keys = sorted({r.partition for r in rows if r.needs_embedding})
    return (keys[0], keys[-1]) if keys else None


def render_markdown(rows: Sequence[BacklogRow]) -> str:
    """A markdown table of the partitions with work (what a backfill would do)."""
    work = pending(rows)
    if not work:
        return "Nothing to embed: every row is up to date."
    lines = [
        "| table | partition | rows | missing | stale | failed |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.table} | {r.partition} | {'' if r.rows is None else r.rows} | {r.missing} "
        f"| {r.stale} | {r.failed} |"
        for r in work
    ]
    total_missing = sum(r.missing for r in work)
    total_stale = sum(r.stale for r in work)
    total_failed = sum(r.failed for r in work)
    lines.append(
        f"| **total** | {len(work)} partitions | | {total_missing} | {total_stale} "
        f"| {total_failed} |"
    )
    return "\n".join(lines)
