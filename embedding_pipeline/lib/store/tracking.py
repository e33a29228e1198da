"""The tracking trigger and the pending index.

The trigger keeps each row's source hash, `pending_since` and text-search vector as its
text changes, so finding rows that need embedding is an index read; the partial "pending"
index of the configured model holds exactly those rows."""

from __future__ import annotations

import zlib

import psycopg
from psycopg import sql

from embedding_pipeline.lib.store.catalog import index_state, qualified_name
from embedding_pipeline.lib.store.domain import (
    TableSpec,
)
from embedding_pipeline.lib.store.expressions import hash_expr, needs_embedding_expr

#: Bumped when the tracking trigger's body changes, so `ensure_schema` replaces it.
TRACKING_VERSION = 2


def tracking_function_name(spec: TableSpec) -> str:
    return f"{spec.table}_embedding_tracking"


def pending_index_name(spec: TableSpec, model_id: str) -> str:
    """The pending index of one model: a short hash of the model id tells them apart."""
    tag = zlib.crc32(model_id.encode()) & 0xFFFFFF
    return f"{spec.table}_{spec.embedding_column}_pending_{tag:06x}"


def _tracking_fingerprint(spec: TableSpec, language: str) -> str:
    """Names everything the trigger body depends on; a change means a new body, and new
    source hashes and text vectors for every row."""
    parts = [
        str(TRACKING_VERSION),
        ",".join(spec.text_columns),
        spec.embedding_column,
        spec.source_hash_column,
        spec.pending_since_column,
        spec.tsv_column,
        language,
    ]
    return "embedding_pipeline tracking " + "|".join(parts)


def tsv_expr(spec: TableSpec, language: str, alias: str | None = None) -> sql.Composed:
    """The row's full-text vector: each text column's `to_tsvector` (the first one, a title
    or name, weighted A; the others B)."""
    config = sql.SQL("{}::regconfig").format(sql.Literal(language))
    parts = [
        sql.SQL("setweight(to_tsvector({}, coalesce({}, '')), {})").format(
            config,
            sql.Identifier(alias, column) if alias else sql.Identifier(column),
            sql.Literal("A" if i == 0 else "B"),
        )
        for i, column in enumerate(spec.text_columns)
    ]
    return sql.SQL(" || ").join(parts)


def _tracking_function(spec: TableSpec, language: str) -> sql.Composed:
    """The body: on insert, or on an update that changed the text (or touched the source
    hash), set the source hash, the text vector and the time the row started to need an
    embedding; on an update that cleared the vector, that time alone. Any other update (the
    pipeline's own vector writes) returns after comparing the text columns."""
    unchanged = sql.SQL(" AND ").join(
        sql.SQL("new.{c} IS NOT DISTINCT FROM old.{c}").format(c=sql.Identifier(c))
        for c in spec.text_columns
    )
    return sql.SQL("""
        CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $body$
        DECLARE
            digest text;
        BEGIN
            IF TG_OP = 'UPDATE' AND {unchanged}
               AND new.{source} IS NOT DISTINCT FROM old.{source} THEN
                IF new.{emb} IS NULL AND old.{emb} IS NOT NULL THEN
                    new.{since} := now();
                END IF;
                RETURN new;
            END IF;
            digest := {hash};
            IF TG_OP = 'INSERT' OR digest IS DISTINCT FROM old.{source} THEN
                new.{tsv} := {tsv_expr};
                new.{since} := now();
            END IF;
            new.{source} := digest;
            RETURN new;
        END
        $body$""").format(
        fn=sql.Identifier(tracking_function_name(spec)),
        unchanged=unchanged,
        hash=hash_expr(spec, "new"),
        source=sql.Identifier(spec.source_hash_column),
        tsv=sql.Identifier(spec.tsv_column),
        tsv_expr=tsv_expr(spec, language, "new"),
        since=sql.Identifier(spec.pending_since_column),
        emb=sql.Identifier(spec.embedding_column),
    )


def create_tracking_trigger(conn: psycopg.Connection, spec: TableSpec) -> None:
    """(Re)create the trigger that calls the tracking function on every insert and update.
    It names no column (no event column list, no WHEN clause), so the application can
    alter or drop its columns, and a model switch its embedding columns, without meeting
    it."""
    name = sql.Identifier(tracking_function_name(spec))
    table = sql.Identifier(spec.table)
    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(name, table))
    conn.execute(
        sql.SQL(
            "CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {t} "
            "FOR EACH ROW EXECUTE FUNCTION {name}()"
        ).format(name=name, t=table)
    )


def ensure_tracking(conn: psycopg.Connection, spec: TableSpec, language: str) -> bool:
    """Install (or bring up to date) the triggers that keep each row's source hash, text
    vector and pending-since time; True if they changed.

    They fire on the application's writes as on `ingest`'s and on hand-written SQL fixes,
    and hash the text only when it changed. When the function is new or its inputs changed
    (other text columns, another language), every row's hash and text vector are computed
    again here, once.
    """
    name = tracking_function_name(spec)
    fingerprint = _tracking_fingerprint(spec, language)
    row = conn.execute(
        "SELECT obj_description(p.oid, 'pg_proc') FROM pg_proc p "
        "WHERE p.proname = %s AND p.pronamespace = current_schema()::regnamespace",
        (name,),
    ).fetchone()
    trigger = conn.execute(
        "SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = %s",
        (qualified_name(spec.table), name),
    ).fetchone()
    current = row is not None and row[0] == fingerprint
    if current and trigger is not None:
        return False
    if not current:
        table = sql.Identifier(spec.table)
        conn.execute(
            sql.SQL(
                "UPDATE {t} SET {source} = {hash}, {tsv} = {tsv_expr}, "
                "{since} = coalesce({since}, now())"
            ).format(
                t=table,
                source=sql.Identifier(spec.source_hash_column),
                hash=hash_expr(spec),
                tsv=sql.Identifier(spec.tsv_column),
                tsv_expr=tsv_expr(spec, language),
                since=sql.Identifier(spec.pending_since_column),
            )
        )
        conn.execute(_tracking_function(spec, language))
        conn.execute(
            sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(
                sql.Identifier(name), sql.Literal(fingerprint)
            )
        )
    create_tracking_trigger(conn, spec)
    return True


#: How long schema upkeep waits for a table lock before leaving an optional index for
#: later: a DDL statement waiting for its lock queues the application's queries behind it.
OPTIONAL_DDL_LOCK_TIMEOUT = "3s"


_PENDING_COMMENT = "embedding_pipeline: rows needing embedding by "


def ensure_pending_index(conn: psycopg.Connection, spec: TableSpec, model_id: str) -> bool:
    """The partial index of the rows that need embedding by `model_id`, keyed by id with
    the partition column included; True if built. Pending indexes of other models are
    dropped.

    It holds only pending rows, so it is empty when everything is current: a run or a
    sensor tick with nothing to do costs one index probe at any table size. Its predicate
    is `expressions.needs_embedding_expr` with the model as a literal, so it belongs to one model.
    It only makes lookups fast (every query is correct without it), so when a lock is not
    granted within `OPTIONAL_DDL_LOCK_TIMEOUT` the change is left to the next call instead
    of making the application wait. Runs in the caller's transaction.
    """
    name = pending_index_name(spec, model_id)
    others = [
        str(r[0])
        for r in conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = to_regclass(%s) AND obj_description(c.oid, 'pg_class') "
            "LIKE %s AND c.relname <> %s",
            (qualified_name(spec.table), _PENDING_COMMENT + "%", name),
        ).fetchall()
    ]
    built = False
    if index_state(conn, name) != "valid":
        built = _optional_ddl(
            conn,
            [
                sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(name)),
                sql.SQL("CREATE INDEX {name} ON {t} ({id}) INCLUDE ({part}) WHERE {needs}").format(
                    name=sql.Identifier(name),
                    t=sql.Identifier(spec.table),
                    id=sql.Identifier(spec.id_column),
                    part=sql.Identifier(spec.partition_column),
                    needs=needs_embedding_expr(spec, model_id=model_id),
                ),
                sql.SQL("COMMENT ON INDEX {} IS {}").format(
                    sql.Identifier(name), sql.Literal(_PENDING_COMMENT + model_id)
                ),
            ],
        )
    for other in others:
        _optional_ddl(conn, [sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(other))])
    return built


def _optional_ddl(conn: psycopg.Connection, statements: list[sql.Composed]) -> bool:
    """Run `statements` in a savepoint with a short lock timeout; False (and nothing done)
    when a lock was not granted in time."""
    row = conn.execute("SELECT current_setting('lock_timeout')").fetchone()
    previous = str(row[0]) if row else "0"
    try:
        with conn.transaction():
            conn.execute(
                "SELECT set_config('lock_timeout', %s, true)", (OPTIONAL_DDL_LOCK_TIMEOUT,)
            )
            for statement in statements:
                conn.execute(statement)
    except psycopg.errors.LockNotAvailable:
        return False
    finally:
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (previous,))
    return True
