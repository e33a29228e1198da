"""What new extractions touched: the queries behind the extraction sensor.

Every statement is an index lookup whose cost follows the size of the new extractions,
never the size of the tables: extractions are read by primary key after a cursor, rows by
the `<table>_extraction_id_idx` index (`embedding_pipeline_tests/dagster/test_sensor.py`
checks the plans).

Extraction ids come from a sequence, so an id can become visible after a larger one (two
ingests whose transactions overlap) or never (a rolled-back ingest). The cursor therefore
keeps, next to the largest id seen, the ids below it not seen yet ("gaps") and looks them
up again on later ticks until a grace period ends.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import sql

from embedding_pipeline.lib.store.domain import TableSpec

#: Most gap ids a cursor keeps; beyond that the oldest are dropped (a backfill covers them).
MAX_GAPS = 1000


@dataclass(frozen=True)
class ExtractionCursor:
    """The sensor's position: the largest extraction id seen and the gaps below it.

    `gaps` maps a missing id to the time (epoch seconds) it was first noticed missing;
    the sensor also puts back there the ids of extractions whose tables a run in flight
    covered (`deferring`), so that they are read again on the next ticks.
    """

    last_id: int = 0
    gaps: Mapping[int, float] = field(default_factory=dict)

    def serialize(self) -> str:
        return json.dumps(
            {"last_id": self.last_id, "gaps": {str(k): v for k, v in sorted(self.gaps.items())}},
            separators=(",", ":"),
        )

    def deferring(
        self,
        ids: Iterable[int],
        *,
        now: float,
        grace_seconds: float,
        since: Mapping[int, float] | None = None,
    ) -> ExtractionCursor:
        """This cursor with `ids` to be read again, like gaps. An id deferred before keeps
        the time it was first deferred (`since`: the previous cursor's gaps) and is not
        deferred again once `grace_seconds` have passed since (the backlog sensor takes
        whatever is still due then)."""
        earlier = since or {}
        kept = {i: earlier.get(i, now) for i in ids}
        gaps = {**self.gaps, **{i: t for i, t in kept.items() if now - t < grace_seconds}}
        return ExtractionCursor(last_id=self.last_id, gaps=gaps)

    @classmethod
    def parse(cls, raw: str | None) -> ExtractionCursor:
        """Read a cursor; a bare integer (the last id) is accepted too."""
        if not raw:
            return cls()
        raw = raw.strip()
        if raw.lstrip("-").isdigit():
            return cls(last_id=int(raw))
        data = json.loads(raw)
        return cls(
            last_id=int(data.get("last_id", 0)),
            gaps={int(k): float(v) for k, v in dict(data.get("gaps", {})).items()},
        )


@dataclass(frozen=True)
class NewExtractions:
    """The extraction ids a tick takes (sorted) and the cursor after them."""

    ids: list[int]
    cursor: ExtractionCursor
    more: bool


def initial_cursor(conn: psycopg.Connection, table: str, *, now: float) -> ExtractionCursor:
    """Where a sensor without a cursor starts: after the newest extraction, watching the
    ids missing just below it (transactions that may still commit). Older extractions are
    history: rows of theirs that still need embedding are the backlog, for a backfill."""
    t = sql.Identifier(table)
    row = conn.execute(sql.SQL("SELECT max(id) FROM {}").format(t)).fetchone()
    last = int(row[0]) if row and row[0] is not None else 0
    recent = {
        int(r[0])
        for r in conn.execute(
            sql.SQL("SELECT id FROM {} WHERE id > %s").format(t), (last - MAX_GAPS,)
        )
    }
    gaps = {i: now for i in range(max(1, last - MAX_GAPS), last) if i not in recent}
    return ExtractionCursor(last_id=last, gaps=gaps)


def new_extractions_query(table: str) -> sql.Composed:
    """Gap ids that appeared, then the next ids after the cursor: two primary-key lookups.

    Parameters: %(gaps)s (bigint[]), %(after)s, %(limit)s.
    """
    t = sql.Identifier(table)
    return sql.SQL(
        "(SELECT id FROM {t} WHERE id = ANY(%(gaps)s::bigint[])) "
        "UNION ALL "
        "(SELECT id FROM {t} WHERE id > %(after)s ORDER BY id LIMIT %(limit)s)"
    ).format(t=t)


def read_new_extractions(
    conn: psycopg.Connection,
    table: str,
    cursor: ExtractionCursor,
    *,
    limit: int,
    now: float,
    grace_seconds: float,
) -> NewExtractions:
    """The extractions committed since `cursor`, at most `limit` past its last id."""
    gap_ids = sorted(cursor.gaps)
    rows = conn.execute(
        new_extractions_query(table), {"gaps": gap_ids, "after": cursor.last_id, "limit": limit}
    ).fetchall()
    found = sorted({int(r[0]) for r in rows})
    found_set = set(found)
    beyond = [i for i in found if i > cursor.last_id]
    last_id = beyond[-1] if beyond else cursor.last_id
    gaps = {
        gap: seen
        for gap, seen in cursor.gaps.items()
        if gap not in found_set and now - seen < grace_seconds
    }
    expected = cursor.last_id + 1
    for i in beyond:
        for missing in range(max(expected, i - MAX_GAPS), i):
            gaps[missing] = now
        expected = i + 1
    if len(gaps) > MAX_GAPS:
        gaps = dict(sorted(gaps.items(), key=lambda kv: (kv[1], kv[0]))[-MAX_GAPS:])
    return NewExtractions(
        ids=found, cursor=ExtractionCursor(last_id=last_id, gaps=gaps), more=len(beyond) >= limit
    )


def months_query(spec: TableSpec) -> sql.Composed:
    """The distinct UTC months (of the partition column) of the rows written by the given
    extractions; NULL for rows without a partition value. Parameter: %(ids)s (bigint[])."""
    return sql.SQL(
        "SELECT DISTINCT date_trunc('month', {part}, 'UTC') FROM {table} "
        "WHERE {ext} = ANY(%(ids)s::bigint[])"
    ).format(
        part=sql.Identifier(spec.partition_column),
        table=sql.Identifier(spec.table),
        ext=sql.Identifier(spec.extraction_column),
    )


def touched_months(
    conn: psycopg.Connection, specs: Iterable[tuple[str, TableSpec]], ids: Sequence[int]
) -> dict[str, list[datetime | None]]:
    """For each (key, table), the months holding rows that `ids` created or changed."""
    out: dict[str, list[datetime | None]] = {}
    if not ids:
        return out
    for key, spec in specs:
        rows = conn.execute(months_query(spec), {"ids": list(ids)}).fetchall()
        if rows:
            out[key] = [r[0] for r in rows]
    return out
