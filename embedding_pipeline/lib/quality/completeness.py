"""Completeness: rows of a window still missing their vector, and rows whose vector is
stale (text changed, or another model made it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from embedding_pipeline.lib.engine.claims import claimed_elsewhere_expr, claiming_sessions
from embedding_pipeline.lib.engine.row_errors import recorded_expr
from embedding_pipeline.lib.quality.queries import own_transaction, table_identifier
from embedding_pipeline.lib.store.domain import TableSpec, Window
from embedding_pipeline.lib.store.expressions import hash_expr, needs_embedding_expr


@dataclass(frozen=True)
class MissingReport:
    """Rows with a NULL embedding, and why each has none.

    Of the `missing`: `failed` the provider refused (no_failed_rows owns them), `empty`
    have no text to embed (not a fault); the others are `pending`. Of those, `claimed`
    are held by another run's claiming session right now (named in `claimed_by`) and
    `overdue` are held by nobody and have waited longer than the freshness limit: nothing
    is embedding them. With a run's window and start snapshot, `owed` are the pending
    rows of the run's months that no one holds and that existed, as they are now, when
    the run started: the rows the run should have embedded. `new_in_run` are rows of its
    months written after it started (inserted or edited by the application): the next
    run's."""

    table: str
    rows: int
    missing: int
    failed: int = 0
    empty: int = 0
    claimed: int = 0
    overdue: int = 0
    sample_ids: list[int] = field(default_factory=list)
    claimed_by: list[str] = field(default_factory=list)
    in_run: bool = False
    owed: int = 0
    new_in_run: int = 0
    claimed_in_run: int = 0
    pending_in_run: int = 0

    @property
    def pending(self) -> int:
        return self.missing - self.failed - self.empty

    @property
    def ok(self) -> bool:
        return self.pending == 0


def _full_xid(xid: sql.Composable) -> sql.Composed:
    """The 64-bit id (`xid8`) of a 32-bit transaction id seen recently (a row's `xmin`):
    its epoch is the current one, or the one before when it is above the current
    counter. Frozen and very old ids come out below every snapshot's horizon."""
    return sql.SQL(
        "(SELECT ((c >> 32) << 32) + x - CASE WHEN x > (c & 4294967295) THEN 4294967296 "
        "ELSE 0 END FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS c, "
        "{}::text::bigint AS x) v)::text::xid8"
    ).format(xid)


def count_missing(
    conn: psycopg.Connection,
    spec: TableSpec,
    *,
    sample_ids: int,
    model_id: str,
    overdue_minutes: float,
    window: Window | None = None,
    start_snapshot: str | None = None,
) -> MissingReport:
    """Count NULL embeddings by reason (one pass over the table's missing rows) and list
    up to `sample_ids` ids of those that need action: rows the run owed (with `window` and
    `start_snapshot`, `pg_current_snapshot()` taken when the run started), else overdue
    rows, else pending ones."""
    emb = sql.Identifier("t", spec.embedding_column)
    in_run = window is not None and bool(start_snapshot)
    where: sql.Composable
    existed: sql.Composable
    if in_run:
        assert window is not None
        where, params = window.clause(spec, "t")
        existed = sql.SQL("pg_visible_in_snapshot({}, %(snapshot)s::pg_snapshot)").format(
            _full_xid(sql.Identifier("t", "xmin"))
        )
        params = {**params, "snapshot": start_snapshot}
    else:
        where, existed, params = sql.SQL("FALSE"), sql.SQL("FALSE"), {}
    params = {**params, "overdue": f"{overdue_minutes} minutes", "n": sample_ids}
    with own_transaction(conn):
        rows = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(table_identifier(spec))
        ).fetchone()
        assert rows is not None
        missing = conn.execute(
            sql.SQL("""
            WITH m AS MATERIALIZED (
                SELECT t.{id} AS id,
                       {failed} AS failed,
                       {empty} AS empty,
                       {claimed} AS claimed,
                       coalesce(t.{since}, '-infinity') < now() - %(overdue)s::interval
                           AS overdue,
                       {where} AS in_run,
                       {existed} AS existed
                FROM {table} t WHERE {emb} IS NULL
            ), p AS (SELECT * FROM m WHERE NOT failed AND NOT empty)
            SELECT (SELECT count(*) FROM m),
                   (SELECT count(*) FROM m WHERE failed),
                   (SELECT count(*) FROM m WHERE empty AND NOT failed),
                   (SELECT count(*) FROM p WHERE claimed),
                   (SELECT count(*) FROM p WHERE NOT claimed AND overdue),
                   (SELECT count(*) FROM p WHERE in_run AND NOT claimed AND existed),
                   (SELECT count(*) FROM p WHERE in_run AND NOT claimed AND NOT existed),
                   (SELECT count(*) FROM p WHERE in_run AND claimed),
                   (SELECT count(*) FROM p WHERE in_run),
                   ARRAY(SELECT id FROM p ORDER BY
                         (in_run AND NOT claimed AND existed) DESC,
                         (NOT claimed AND overdue) DESC, id LIMIT %(n)s)
            """).format(
                id=sql.Identifier(spec.id_column),
                failed=recorded_expr(spec, model_id, kind="failed"),
                empty=recorded_expr(spec, model_id, kind="empty"),
                claimed=claimed_elsewhere_expr(spec, "t"),
                since=sql.Identifier(spec.pending_since_column),
                where=where,
                existed=existed,
                table=table_identifier(spec),
                emb=emb,
            ),
            params,
        ).fetchone()
        assert missing is not None
        claimed_by = claiming_sessions(conn, spec) if missing[3] else []
    return MissingReport(
        table=spec.table,
        rows=int(rows[0]),
        missing=int(missing[0]),
        failed=int(missing[1]),
        empty=int(missing[2]),
        claimed=int(missing[3]),
        overdue=int(missing[4]),
        sample_ids=[int(i) for i in missing[9]],
        claimed_by=claimed_by,
        in_run=in_run,
        owed=int(missing[5]),
        new_in_run=int(missing[6]),
        claimed_in_run=int(missing[7]),
        pending_in_run=int(missing[8]),
    )


@dataclass(frozen=True)
class StaleReport:
    """Embedded rows whose vector no longer matches the text or the configured model.

    Staleness is read from the stored source hash the tracking trigger keeps (no row is
    hashed); `untracked` counts sampled rows whose stored source hash differs from the
    hash of their text, which only happens when writes bypass the trigger (disabled
    triggers, `session_replication_role = replica`)."""

    table: str
    model_id: str
    rows: int
    embedded: int
    stale: int
    text_changed: int
    other_model: int
    sample_ids: list[int]
    tracking_sampled: int = 0
    untracked: int = 0

    @property
    def ok(self) -> bool:
        return self.stale == 0 and self.untracked == 0


def count_stale(
    conn: psycopg.Connection,
    spec: TableSpec,
    *,
    model_id: str,
    sample_ids: int,
    tracking_sample: int = 1000,
) -> StaleReport:
    """Count stale embeddings by `needs_embedding_expr` (the rule the sync itself uses),
    split by reason (a row can be stale for both), and check the tracking trigger on a
    sample of `tracking_sample` rows."""
    emb = sql.Identifier(spec.embedding_column)
    model = sql.Identifier(spec.model_column)
    needs = needs_embedding_expr(spec, model_id=model_id)
    with own_transaction(conn):
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), count(*) FILTER (WHERE {emb} IS NOT NULL), "
                "count(*) FILTER (WHERE {emb} IS NOT NULL AND {needs}), "
                "count(*) FILTER (WHERE {emb} IS NOT NULL AND {hash} IS DISTINCT FROM {source}), "
                "count(*) FILTER (WHERE {emb} IS NOT NULL AND {model} IS DISTINCT FROM "
                "%(model_id)s) FROM {table}"
            ).format(
                emb=emb,
                needs=needs,
                hash=sql.Identifier(spec.hash_column),
                source=sql.Identifier(spec.source_hash_column),
                model=model,
                table=table_identifier(spec),
            ),
            {"model_id": model_id},
        ).fetchone()
        assert row is not None
        ids: list[int] = []
        if row[2]:
            ids = [
                int(r[0])
                for r in conn.execute(
                    sql.SQL(
                        "SELECT {id} FROM {table} WHERE {emb} IS NOT NULL AND {needs} "
                        "ORDER BY {id} LIMIT %(n)s"
                    ).format(
                        id=sql.Identifier(spec.id_column),
                        table=table_identifier(spec),
                        emb=emb,
                        needs=needs,
                    ),
                    {"n": sample_ids},
                ).fetchall()
            ]
        estimate = conn.execute(
            "SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)",
            (table_identifier(spec).as_string(),),
        ).fetchone()
        estimated_rows = float(estimate[0]) if estimate and estimate[0] > 0 else 0.0
        percent = (
            100.0 if estimated_rows <= 0 else min(100.0, 300.0 * tracking_sample / estimated_rows)
        )
        tracking = conn.execute(
            sql.SQL(
                "SELECT count(*), count(*) FILTER (WHERE {source} IS DISTINCT FROM {current}) "
                "FROM (SELECT * FROM {table} TABLESAMPLE SYSTEM (%(percent)s) LIMIT %(n)s) t"
            ).format(
                source=sql.Identifier(spec.source_hash_column),
                current=hash_expr(spec),
                table=table_identifier(spec),
            ),
            {"n": tracking_sample, "percent": percent},
        ).fetchone()
        assert tracking is not None
    return StaleReport(
        table=spec.table,
        model_id=model_id,
        rows=int(row[0]),
        embedded=int(row[1]),
        stale=int(row[2]),
        text_changed=int(row[3]),
        other_model=int(row[4]),
        sample_ids=ids,
        tracking_sampled=int(tracking[0]),
        untracked=int(tracking[1]),
    )
