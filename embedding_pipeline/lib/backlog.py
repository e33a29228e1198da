"""The backlog: how many rows of each table need embedding, per month partition.

A dry run of a backfill (it replaces the old `backfill_embeddings.py --dry-run`): the
CLI's `embedding-pipeline backlog` prints it and the source assets attach it as
metadata. One grouped scan per table; nothing is embedded or written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from embedding_pipeline.lib.db import needs_embedding_expr
from embedding_pipeline.settings import TableSpec


@dataclass(frozen=True)
class BacklogRow:
    """One table's rows in one partition: `missing` have no embedding, `stale` have one
    made from other text or by another model."""

    table: str
    partition: str
    rows: int
    missing: int
    stale: int

    @property
    def needs_embedding(self) -> int:
        return self.missing + self.stale

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "needs_embedding": self.needs_embedding}


def backlog_query(spec: TableSpec) -> sql.Composed:
    """Counts grouped by UTC month of the partition column (NULL month: no value).
    Parameter: %(model_id)s."""
    emb = sql.Identifier(spec.embedding_column)
    return sql.SQL(
        "SELECT date_trunc('month', {part}, 'UTC') AS month, count(*), "
        "count(*) FILTER (WHERE {emb} IS NULL), "
        "count(*) FILTER (WHERE {emb} IS NOT NULL AND {needs}) "
        "FROM {table} GROUP BY 1 ORDER BY 1 NULLS FIRST"
    ).format(
        part=sql.Identifier(spec.partition_column),
        emb=emb,
        needs=needs_embedding_expr(spec),
        table=sql.Identifier(spec.table),
    )


def table_backlog(
    conn: psycopg.Connection,
    spec: TableSpec,
    model_id: str,
    partition_for: Callable[[datetime | None], str],
) -> list[BacklogRow]:
    """Per-partition counts of one table (months mapped to keys by `partition_for`)."""
    merged: dict[str, list[int]] = {}
    for month, rows, missing, stale in conn.execute(backlog_query(spec), {"model_id": model_id}):
        counts = merged.setdefault(partition_for(month), [0, 0, 0])
        counts[0] += int(rows)
        counts[1] += int(missing)
        counts[2] += int(stale)
    return [
        BacklogRow(table=spec.table, partition=key, rows=c[0], missing=c[1], stale=c[2])
        for key, c in sorted(merged.items())
    ]


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
    return [r for r in rows if r.needs_embedding]


def partition_range(rows: Sequence[BacklogRow]) -> tuple[str, str] | None:
    """The first and last partition with work, or None when nothing is pending."""
    keys = sorted({r.partition for r in pending(rows)})
    return (keys[0], keys[-1]) if keys else None


def render_markdown(rows: Sequence[BacklogRow]) -> str:
    """A markdown table of the partitions with work (what a backfill would do)."""
    work = pending(rows)
    if not work:
        return "Nothing to embed: every row is up to date."
    lines = ["| table | partition | rows | missing | stale |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r.table} | {r.partition} | {r.rows} | {r.missing} | {r.stale} |" for r in work]
    total_missing = sum(r.missing for r in work)
    total_stale = sum(r.stale for r in work)
    lines.append(f"| **total** | {len(work)} partitions | | {total_missing} | {total_stale} |")
    return "\n".join(lines)
