"""Claims: which run embeds which rows.

A run claims rows with session-level advisory locks keyed by the column's namespace and
the row id, in short transactions, and writes with a compare-and-set on the row's source
hash. `ClaimStatements` holds every statement of that cycle, built once per run;
`claimed_elsewhere_expr` and `claiming_sessions` let checks see other runs' claims."""

from __future__ import annotations

import zlib
from functools import cached_property

import psycopg
from psycopg import sql

from embedding_pipeline.lib.engine import row_errors
from embedding_pipeline.lib.store.domain import TableSpec, Window
from embedding_pipeline.lib.store.expressions import needs_embedding_expr, text_expr


def lock_namespace(spec: TableSpec) -> int:
    """A per-column number that, shifted left 32 bits plus the row id's low 32 bits, is the
    advisory lock key of a row: exact for ids below 2**32; above, two ids of one column
    that differ by a multiple of 2**32 share a key (a run then skips one, the next run
    embeds it), and never a key of another column. Per column, so that filling a
    model switch's shadow column never contends with the live column's runs."""
    return zlib.crc32(f"{spec.table}.{spec.embedding_column}".encode()) & 0x7FFFFFFF


#: `application_name` of a run's claiming session (followed by the run's label), so that
#: checks can tell the claims of a run at work from any other lock on the same key.
CLAIM_SESSION_NAME = "embedding_pipeline claims"


def claim_session_name(label: str) -> str:
    """The `application_name` of a run's claiming session (PostgreSQL keeps 63 bytes)."""
    return f"{CLAIM_SESSION_NAME} {label}".strip()[:63]


def _claims_elsewhere(spec: TableSpec) -> sql.Composed:
    """The advisory locks on `spec`'s rows held by other runs' claiming sessions."""
    return sql.SQL(
        "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.classid = {ns}::oid AND l.pid <> pg_backend_pid() "
        "AND starts_with(a.application_name, {name})"
    ).format(ns=sql.Literal(lock_namespace(spec)), name=sql.Literal(CLAIM_SESSION_NAME))


def claimed_elsewhere_expr(spec: TableSpec, alias: str) -> sql.Composed:
    """True for a row whose claim another run's claiming session holds: that run is
    embedding it now. One read of `pg_locks` per statement (the sub-select is not
    correlated); ids above 2**32 can share a key, as for the claims themselves."""
    return sql.SQL("({id} & 4294967295) IN (SELECT l.objid::bigint {claims})").format(
        id=sql.Identifier(alias, spec.id_column), claims=_claims_elsewhere(spec)
    )


def claiming_sessions(conn: psycopg.Connection, spec: TableSpec) -> list[str]:
    """Who else holds claims on `spec`'s rows now: each claiming session's name (with its
    run's label) and process id."""
    rows = conn.execute(
        sql.SQL("SELECT DISTINCT a.application_name, l.pid {claims} ORDER BY 1, 2").format(
            claims=_claims_elsewhere(spec)
        )
    ).fetchall()
    return [f"{name} (pid {pid})" for name, pid in rows]


class ClaimStatements:
    """Every statement of one run's claim cycle over `spec`'s rows in `window` for
    `model_id`, each built once (the shape of pgai's query builder). Parameters:
    `namespace` (`lock_namespace`), `after`/`limit` (the claim walks the window by id),
    `ids` (rows claimed, to re-read, release or take back) and `model_id` (the write)."""

    def __init__(self, spec: TableSpec, model_id: str, window: Window) -> None:
        self.spec = spec
        self.model_id = model_id
        self._where, self.window_params = window.clause(spec)
        self._table = sql.Identifier(spec.table)
        self._id = sql.Identifier("t", spec.id_column)
        self._needs = needs_embedding_expr(spec, "t", model_id=model_id)

    @cached_property
    def claim(self) -> sql.Composed:
        """The next `limit` rows after `after` that need embedding and are not blocked by
        a recorded failure, each with whether its advisory lock was taken (a row another
        run holds is skipped, not waited for)."""
        return sql.SQL("""
            WITH candidates AS MATERIALIZED (
                SELECT {id} AS id FROM {table} t
                WHERE {needs} AND {where} AND {id} > %(after)s AND NOT {blocked}
                ORDER BY {id}
                LIMIT %(limit)s
            )
            SELECT id, pg_try_advisory_lock((%(namespace)s::bigint << 32) + (id & 4294967295))
            FROM candidates ORDER BY id
        """).format(
            id=self._id,
            table=self._table,
            needs=self._needs,
            where=self._where,
            blocked=row_errors.blocked_expr(self.spec, self.model_id),
        )

    @cached_property
    def reread(self) -> sql.Composed:
        """The claimed rows that still need embedding, now that they are locked: id, text,
        source hash, and whether the row failed before (it then travels alone)."""
        return sql.SQL("""
            SELECT {id}, {text}, t.{source}, {failed_before} FROM {table} t
            WHERE {id} = ANY(%(ids)s) AND {needs} AND NOT {blocked}
        """).format(
            id=self._id,
            text=text_expr(self.spec, "t"),
            source=sql.Identifier(self.spec.source_hash_column),
            failed_before=row_errors.failed_before_expr(self.spec),
            table=self._table,
            needs=self._needs,
            blocked=row_errors.blocked_expr(self.spec, self.model_id),
        )

    @cached_property
    def write(self) -> sql.Composed:
        """Compare-and-set: store the staged vectors (`ep_staging`) of rows whose source
        hash is still the one embedded; returns the ids written."""
        spec = self.spec
        return sql.SQL("""
            UPDATE {table} t
            SET {emb} = s.embedding, {model} = %(model_id)s, {hash_col} = s.hash,
                {at} = clock_timestamp()
            FROM ep_staging s
            WHERE {id} = s.id AND t.{source} = s.hash
            RETURNING {id}
        """).format(
            table=self._table,
            emb=sql.Identifier(spec.embedding_column),
            model=sql.Identifier(spec.model_column),
            hash_col=sql.Identifier(spec.hash_column),
            at=sql.Identifier(spec.embedded_at_column),
            id=self._id,
            source=sql.Identifier(spec.source_hash_column),
        )

    @cached_property
    def release(self) -> sql.SQL:
        """Give back the locks of `ids` (rows written, recorded, or done elsewhere)."""
        return sql.SQL(
            "SELECT count(pg_advisory_unlock((%(namespace)s::bigint << 32) + (id & 4294967295)))"
            " FROM unnest(%(ids)s::bigint[]) AS id"
        )

    @cached_property
    def relock(self) -> sql.SQL:
        """After a reconnect: take back the locks of `ids` still free; returns those taken."""
        return sql.SQL(
            "SELECT id FROM unnest(%(ids)s::bigint[]) AS id "
            "WHERE pg_try_advisory_lock((%(namespace)s::bigint << 32) + (id & 4294967295))"
        )
