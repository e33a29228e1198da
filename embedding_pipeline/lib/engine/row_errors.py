"""The errors table: rows a provider refused to embed, why, and when they are tried again.

One row per (table, embedding column, row id). A failure is recorded with the hash of the
text that failed and the model that refused it; the row is skipped by every run until its
`next_attempt_at` (a wait that doubles with each attempt), and after `max_attempts` for
good (`next_attempt_at` = infinity) until its text changes (a new source hash no longer
matches the record, so the row is pending again), the model changes, or an operator resets
it (`embedding-pipeline errors retry`). A successful embedding deletes the record.

A row given up keeps no vector: the vector of its old text would otherwise keep answering
searches for text the row no longer has. Its vector is withdrawn (set to NULL, compare-and-
set on the text that failed) when it is given up, so no search mode returns it, and the
row counts as failed everywhere until its text changes or an operator resets it.

Empty text is not an error but "nothing to embed": the row gets no vector (an old one is
withdrawn), is recorded with the class `empty_text` so that no run picks it up again until
its text changes, and is counted apart (`empty`), neither missing nor failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import psycopg
from psycopg import sql

from embedding_pipeline.lib.store.domain import TableSpec
from embedding_pipeline.lib.store.schema import ERRORS_TABLE

#: The class of rows whose text is empty: nothing to embed (not an error).
EMPTY_TEXT = "empty_text"
#: Error classes recorded without trying again: nothing but new text can change them.
FINAL_CLASSES = frozenset({EMPTY_TEXT})
#: Which records `recorded_expr` matches: any, the provider's refusals, or empty texts.
RecordKind = Literal["any", "failed", "empty"]


@dataclass(frozen=True)
class RowErrorPolicy:
    """How often a refused row is tried again, and how long the waits between tries are."""

    max_attempts: int = 3
    retry_base_seconds: float = 300.0


@dataclass(frozen=True)
class RowFailure:
    row_id: int
    source_hash: str | None
    error_class: str
    message: str


@dataclass(frozen=True)
class ErrorRecord:
    table: str
    column: str
    row_id: int
    model_id: str
    error_class: str
    message: str
    attempts: int
    first_seen: datetime
    last_seen: datetime
    next_attempt_at: datetime | None  # None: given up (until the text changes or a reset)

    def as_dict(self) -> dict[str, object]:
        return {
            "table": self.table,
            "column": self.column,
            "id": self.row_id,
            "model": self.model_id,
            "error_class": self.error_class,
            "reason": self.message,
            "attempts": self.attempts,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
        }


def _table() -> sql.Identifier:
    return sql.Identifier(ERRORS_TABLE)


#: The columns of an `ErrorRecord`, in its field order (`e` is the errors table).
_RECORD_COLUMNS = sql.SQL(
    "e.table_name, e.column_name, e.row_id, e.model_id, e.error_class, e.message, e.attempts, "
    "e.first_seen, e.last_seen, "
    "CASE WHEN e.next_attempt_at = 'infinity' THEN NULL ELSE e.next_attempt_at END"
)


def _same_text(spec: TableSpec) -> sql.Composed:
    """Joins a record `e` to its row `t` as long as the row still has the text that failed."""
    return sql.SQL("t.{id} = e.row_id AND t.{source} IS NOT DISTINCT FROM e.source_hash").format(
        id=sql.Identifier(spec.id_column), source=sql.Identifier(spec.source_hash_column)
    )


def recorded_expr(
    spec: TableSpec,
    model_id: str,
    alias: str = "t",
    *,
    waiting_only: bool = False,
    kind: RecordKind = "any",
    given_up_only: bool = False,
) -> sql.Composable:
    """True for a row of `spec` whose current text is recorded with `model_id`: any
    record, the provider's refusals only (`failed`), or empty texts only (`empty`); with
    `waiting_only`, only while it is not due for another try yet; with `given_up_only`,
    only once no try is left."""
    extra: list[sql.Composable] = []
    if waiting_only:
        extra.append(sql.SQL(" AND e.next_attempt_at > now()"))
    if given_up_only:
        extra.append(sql.SQL(" AND e.next_attempt_at = 'infinity'"))
    if kind != "any":
        extra.append(
            sql.SQL(" AND e.error_class {} {}").format(
                sql.SQL("=" if kind == "empty" else "<>"), sql.Literal(EMPTY_TEXT)
            )
        )
    return sql.SQL(
        "EXISTS (SELECT 1 FROM {errors} e WHERE e.table_name = {table} "
        "AND e.column_name = {column} AND e.row_id = {id} AND e.model_id = {model} "
        "AND e.source_hash IS NOT DISTINCT FROM {source}{extra})"
    ).format(
        errors=_table(),
        table=sql.Literal(spec.table),
        column=sql.Literal(spec.embedding_column),
        id=sql.Identifier(alias, spec.id_column),
        model=sql.Literal(model_id),
        source=sql.Identifier(alias, spec.source_hash_column),
        extra=sql.Composed(extra),
    )


def blocked_expr(spec: TableSpec, model_id: str, alias: str = "t") -> sql.Composable:
    """True for a row whose current text failed with `model_id` and is not due for
    another try yet: runs skip it."""
    return recorded_expr(spec, model_id, alias, waiting_only=True)


def failed_before_expr(spec: TableSpec, alias: str = "t") -> sql.Composable:
    """True for a row with any error record (its next try goes alone in its request)."""
    return sql.SQL(
        "EXISTS (SELECT 1 FROM {errors} e WHERE e.table_name = {table} "
        "AND e.column_name = {column} AND e.row_id = {id})"
    ).format(
        errors=_table(),
        table=sql.Literal(spec.table),
        column=sql.Literal(spec.embedding_column),
        id=sql.Identifier(alias, spec.id_column),
    )


def record_failures(
    conn: psycopg.Connection,
    spec: TableSpec,
    model_id: str,
    failures: Sequence[RowFailure],
    policy: RowErrorPolicy,
) -> int:
    """Upsert one record per failed row (in the caller's transaction). The attempt count
    grows while the text and model stay the same and starts again at 1 otherwise. Rows
    given up with this failure lose their vector (`withdraw_given_up`); returns how many."""
    if not failures:
        return 0
    same = sql.SQL(
        "(e.source_hash IS NOT DISTINCT FROM excluded.source_hash "
        "AND e.model_id = excluded.model_id)"
    )
    attempts = sql.SQL("(CASE WHEN {} THEN e.attempts + 1 ELSE 1 END)").format(same)
    conn.execute(
        sql.SQL("""
        INSERT INTO {errors} AS e (table_name, column_name, row_id, source_hash, model_id,
                                   error_class, message, attempts, next_attempt_at)
        SELECT %(table)s, %(column)s, f.row_id, f.source_hash, %(model)s, f.error_class,
               f.message, 1,
               CASE WHEN f.error_class = ANY(%(final)s) OR %(max)s <= 1 THEN 'infinity'
                    ELSE now() + make_interval(secs => %(base)s) END
        FROM unnest(%(ids)s::bigint[], %(hashes)s::text[], %(classes)s::text[],
                    %(messages)s::text[]) AS f(row_id, source_hash, error_class, message)
        ON CONFLICT (table_name, column_name, row_id) DO UPDATE SET
            attempts = {attempts},
            first_seen = CASE WHEN {same} THEN e.first_seen ELSE now() END,
            source_hash = excluded.source_hash,
            model_id = excluded.model_id,
            error_class = excluded.error_class,
            message = excluded.message,
            last_seen = now(),
            next_attempt_at = CASE
                WHEN excluded.error_class = ANY(%(final)s) OR {attempts} >= %(max)s
                THEN 'infinity'::timestamptz
                ELSE now() + make_interval(secs => %(base)s * power(2, {attempts} - 1)) END
        """).format(errors=_table(), attempts=attempts, same=same),
        {
            "table": spec.table,
            "column": spec.embedding_column,
            "model": model_id,
            "final": list(FINAL_CLASSES),
            "max": policy.max_attempts,
            "base": policy.retry_base_seconds,
            "ids": [f.row_id for f in failures],
            "hashes": [f.source_hash for f in failures],
            "classes": [f.error_class for f in failures],
            "messages": [f.message for f in failures],
        },
    )
    return withdraw_given_up(conn, spec, [f.row_id for f in failures])


def withdraw_given_up(
    conn: psycopg.Connection, spec: TableSpec, ids: Sequence[int] | None = None
) -> int:
    """Set to NULL the vector of every row (of `ids`, or all) whose current text is given
    up (no try left) or empty, in the caller's transaction; the number withdrawn. Only
    while the row still has the text that failed: a row edited meanwhile keeps its vector
    until it is embedded again."""
    only = sql.SQL("AND e.row_id = ANY(%(ids)s)") if ids is not None else sql.SQL("")
    cursor = conn.execute(
        sql.SQL("""
        UPDATE {t} t SET {emb} = NULL, {hash} = NULL, {model} = NULL, {at} = NULL
        FROM {errors} e
        WHERE e.table_name = %(table)s AND e.column_name = %(column)s {only}
          AND e.next_attempt_at = 'infinity' AND t.{id} = e.row_id
          AND t.{source} IS NOT DISTINCT FROM e.source_hash AND t.{emb} IS NOT NULL
        """).format(
            t=sql.Identifier(spec.table),
            emb=sql.Identifier(spec.embedding_column),
            hash=sql.Identifier(spec.hash_column),
            model=sql.Identifier(spec.model_column),
            at=sql.Identifier(spec.embedded_at_column),
            errors=_table(),
            only=only,
            id=sql.Identifier(spec.id_column),
            source=sql.Identifier(spec.source_hash_column),
        ),
        {"table": spec.table, "column": spec.embedding_column, "ids": list(ids or [])},
    )
    return max(cursor.rowcount, 0)


def clear_rows(conn: psycopg.Connection, spec: TableSpec, ids: Iterable[int]) -> int:
    """Forget the errors of rows that were embedded after all (caller's transaction)."""
    ids = list(ids)
    if not ids:
        return 0
    cursor = conn.execute(
        sql.SQL(
            "DELETE FROM {} WHERE table_name = %s AND column_name = %s AND row_id = ANY(%s)"
        ).format(_table()),
        (spec.table, spec.embedding_column, ids),
    )
    return max(cursor.rowcount, 0)


def prune_obsolete(conn: psycopg.Connection, spec: TableSpec) -> int:
    """Delete the records of rows that are gone or whose text changed since they failed
    (the new text gets its own chance), and withdraw any vector a row given up still has
    (given up before vectors were withdrawn). Commits."""
    with conn.transaction():
        withdraw_given_up(conn, spec)
        cursor = conn.execute(
            sql.SQL(
                "DELETE FROM {errors} e WHERE e.table_name = %s AND e.column_name = %s "
                "AND NOT EXISTS (SELECT 1 FROM {t} t WHERE {same})"
            ).format(errors=_table(), t=sql.Identifier(spec.table), same=_same_text(spec)),
            (spec.table, spec.embedding_column),
        )
    return max(cursor.rowcount, 0)


def _where(
    specs: Sequence[TableSpec], ids: Sequence[int] | None
) -> tuple[sql.Composable, dict[str, object]]:
    params: dict[str, object] = {
        "pairs": [f"{s.table}.{s.embedding_column}" for s in specs],
    }
    where: sql.Composable = sql.SQL("table_name || '.' || column_name = ANY(%(pairs)s)")
    if ids:
        where = sql.SQL("{} AND row_id = ANY(%(ids)s)").format(where)
        params["ids"] = list(ids)
    return where, params


def list_errors(
    conn: psycopg.Connection,
    specs: Sequence[TableSpec],
    *,
    ids: Sequence[int] | None = None,
    limit: int | None = None,
) -> list[ErrorRecord]:
    """The recorded failures of `specs`' embedding columns, oldest first."""
    where, params = _where(specs, ids)
    rows = conn.execute(
        sql.SQL("SELECT {} FROM {} e WHERE {} ORDER BY e.table_name, e.row_id {}").format(
            _RECORD_COLUMNS,
            _table(),
            where,
            sql.SQL("LIMIT {}").format(sql.Literal(limit)) if limit else sql.SQL(""),
        ),
        params,
    ).fetchall()
    return [ErrorRecord(*row) for row in rows]


def retry_now(
    conn: psycopg.Connection, specs: Sequence[TableSpec], ids: Sequence[int] | None = None
) -> int:
    """Make recorded rows due at once with a fresh attempt count (the next run tries them);
    all of `specs`' records when `ids` is None. Commits."""
    where, params = _where(specs, ids)
    with conn.transaction():
        cursor = conn.execute(
            sql.SQL("UPDATE {} SET attempts = 0, next_attempt_at = now() WHERE {}").format(
                _table(), where
            ),
            params,
        )
    return max(cursor.rowcount, 0)


def clear_errors(
    conn: psycopg.Connection, specs: Sequence[TableSpec], ids: Sequence[int] | None = None
) -> int:
    """Delete records (all of `specs`' when `ids` is None); the rows become plain pending
    rows again. Commits."""
    where, params = _where(specs, ids)
    with conn.transaction():
        cursor = conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(_table(), where), params)
    return max(cursor.rowcount, 0)


@dataclass(frozen=True)
class FailedRows:
    """Rows whose current text the provider refused: `given_up` wait for new text or a
    reset (and hold no vector), `retrying` are tried again when due. `empty` rows have no
    text to embed: counted apart, not failures."""

    given_up: int
    retrying: int
    samples: list[ErrorRecord]
    empty: int = 0

    @property
    def total(self) -> int:
        return self.given_up + self.retrying


def failed_rows(
    conn: psycopg.Connection, spec: TableSpec, model_id: str, *, sample: int = 10
) -> FailedRows:
    """Counts and samples of the failures that still hold: the row exists with the text
    that failed, under the configured model."""
    current = sql.SQL(
        "FROM {errors} e JOIN {t} t ON {same} "
        "WHERE e.table_name = %(table)s AND e.column_name = %(column)s AND e.model_id = %(model)s"
    ).format(errors=_table(), t=sql.Identifier(spec.table), same=_same_text(spec))
    params = {
        "table": spec.table,
        "column": spec.embedding_column,
        "model": model_id,
        "empty": EMPTY_TEXT,
    }
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE e.next_attempt_at = 'infinity' "
            "AND e.error_class <> %(empty)s), "
            "count(*) FILTER (WHERE e.next_attempt_at <> 'infinity' "
            "AND e.error_class <> %(empty)s), "
            "count(*) FILTER (WHERE e.error_class = %(empty)s) {}"
        ).format(current),
        params,
    ).fetchone()
    samples = conn.execute(
        sql.SQL(
            "SELECT {} {} AND e.error_class <> %(empty)s ORDER BY e.row_id LIMIT %(sample)s"
        ).format(_RECORD_COLUMNS, current),
        {**params, "sample": sample},
    ).fetchall()
    assert row is not None
    return FailedRows(
        given_up=int(row[0]),
        retrying=int(row[1]),
        empty=int(row[2]),
        samples=[ErrorRecord(*r) for r in samples],
    )
