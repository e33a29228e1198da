"""Idempotent schema creation and upgrade.

`ensure_schema` creates what is missing and never drops or rewrites data: on an existing
application database it only adds the pipeline's bookkeeping columns and indexes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from embedding_pipeline.lib.store.domain import (
    SEARCH_FILTER_COLUMNS,
    VECTOR_TYPES,
    HnswSettings,
    StoreSettings,
    TableSpec,
)
from embedding_pipeline.lib.store.expressions import hash_expr, needs_embedding_expr

# Advisory lock key held while the schema changes, so concurrent runs do not race.
SCHEMA_LOCK_KEY = 7_318_004_211
#: Which model each embedding column belongs to, written by `model switch` (lib/model_switch.py).
MODEL_REGISTRY_TABLE = "embedding_models"
#: Rows a provider refused to embed, with the reason and when they are tried again
#: (lib/engine/errors.py).
ERRORS_TABLE = "embedding_errors"
#: Small facts the pipeline keeps between runs (key, value, when), e.g. a failed bulk load.
STATE_TABLE = "embedding_pipeline_state"
#: Bumped when the tracking trigger's body changes, so `ensure_schema` replaces it.
TRACKING_VERSION = 2


class SchemaError(RuntimeError):
    """The database cannot hold what the configuration asks for."""


@dataclass
class SchemaReport:
    created_tables: list[str] = field(default_factory=list)
    added_columns: list[str] = field(default_factory=list)
    created_indexes: list[str] = field(default_factory=list)
    created_triggers: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[str]:
        return (
            self.created_tables
            + self.added_columns
            + self.created_indexes
            + [f"trigger {name}" for name in self.created_triggers]
        )

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def hnsw_index_name(spec: TableSpec) -> str:
    return f"{spec.table}_{spec.embedding_column}_hnsw_idx"


def pending_index_name(spec: TableSpec, model_id: str) -> str:
    """The pending index of one model: a short hash of the model id tells them apart."""
    tag = zlib.crc32(model_id.encode()) & 0xFFFFFF
    return f"{spec.table}_{spec.embedding_column}_pending_{tag:06x}"


def tracking_function_name(spec: TableSpec) -> str:
    return f"{spec.table}_embedding_tracking"


def relation_exists(conn: psycopg.Connection, name: str) -> bool:
    """Whether a table or index called `name` exists (on the search path)."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (_qualified(name),)).fetchone()
    return bool(row and row[0])


def _qualified(table: str) -> str:
    return sql.Identifier(table).as_string()


def _columns(conn: psycopg.Connection, table: str) -> dict[str, str]:
    rows = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod)
        FROM pg_attribute a
        WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
        """,
        (_qualified(table),),
    ).fetchall()
    return {name: type_name for name, type_name in rows}


def vector_column_type(conn: psycopg.Connection, spec: TableSpec) -> tuple[str, int] | None:
    """The embedding column's storage type (`vector` or `halfvec`) and declared dimension
    (None: missing, of another type, or undeclared)."""
    type_name = _columns(conn, spec.table).get(spec.embedding_column)
    if type_name is None:
        return None
    kind, _, rest = type_name.partition("(")
    if kind not in VECTOR_TYPES or not rest.endswith(")") or not rest[:-1].isdigit():
        return None
    return kind, int(rest[:-1])


def vector_column_dimension(conn: psycopg.Connection, spec: TableSpec) -> int | None:
    """The declared dimension of the embedding column (None: missing or undeclared)."""
    found = vector_column_type(conn, spec)
    return found[1] if found else None


def column_type_sql(vector_type: str, dimension: int) -> sql.Composed:
    """`vector(n)` or `halfvec(n)`."""
    return sql.SQL("{}({})").format(sql.SQL(vector_type), sql.Literal(dimension))


def _base_tables(settings: StoreSettings) -> list[tuple[str, sql.Composed]]:
    """CREATE TABLE IF NOT EXISTS statements for the pipeline's own schema."""
    t = settings.tables
    ident = sql.Identifier
    extractions = ident(settings.extraction_table)
    messages, topics, atoms = (
        ident(t["messages"].table),
        ident(t["topics"].table),
        ident(t["atoms"].table),
    )
    links = ident(f"{t['atoms'].table}_messages")
    topic_id, message_id, atom_id = (ident(t[k].id_column) for k in ("topics", "messages", "atoms"))
    return [
        (
            settings.extraction_table,
            sql.SQL("""
            CREATE TABLE IF NOT EXISTS {extractions} (
                id bigserial PRIMARY KEY,
                source text NOT NULL,
                extractor text,
                export_sha256 text,
                extraction_sha256 text,
                created_at timestamptz NOT NULL DEFAULT now(),
                stats jsonb NOT NULL DEFAULT '{{}}'::jsonb
            )""").format(extractions=extractions),
        ),
        (
            t["topics"].table,
            sql.SQL("""
            CREATE TABLE IF NOT EXISTS {topics} (
                {topic_id} bigserial PRIMARY KEY,
                key text NOT NULL UNIQUE,
                name text NOT NULL,
                description text,
                created_at timestamptz NOT NULL DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now()
            )""").format(topics=topics, topic_id=topic_id),
        ),
        (
            t["messages"].table,
            sql.SQL("""
            CREATE TABLE IF NOT EXISTS {messages} (
                {message_id} bigserial PRIMARY KEY,
                chat_id bigint NOT NULL,
                telegram_message_id bigint NOT NULL,
                author text,
                author_id text,
                sent_at timestamptz NOT NULL,
                edited_at timestamptz,
                reply_to_message_id bigint,
                content text NOT NULL,
                topic_id bigint REFERENCES {topics} ({topic_id}) ON DELETE SET NULL,
                created_at timestamptz NOT NULL DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now(),
                UNIQUE (chat_id, telegram_message_id)
            )""").format(
                messages=messages, topics=topics, message_id=message_id, topic_id=topic_id
            ),
        ),
        (
            t["atoms"].table,
            sql.SQL("""
            CREATE TABLE IF NOT EXISTS {atoms} (
                {atom_id} bigserial PRIMARY KEY,
                key text NOT NULL UNIQUE,
                kind text NOT NULL,
                title text NOT NULL,
                content text NOT NULL,
                topic_id bigint REFERENCES {topics} ({topic_id}) ON DELETE SET NULL,
                created_at timestamptz NOT NULL DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now()
            )""").format(atoms=atoms, topics=topics, atom_id=atom_id, topic_id=topic_id),
        ),
        (
            f"{t['atoms'].table}_messages",
            sql.SQL("""
            CREATE TABLE IF NOT EXISTS {links} (
                atom_id bigint NOT NULL REFERENCES {atoms} ({atom_id}) ON DELETE CASCADE,
                message_id bigint NOT NULL REFERENCES {messages} ({message_id})
                    ON DELETE CASCADE,
                PRIMARY KEY (atom_id, message_id)
            )""").format(
                links=links, atoms=atoms, messages=messages, atom_id=atom_id, message_id=message_id
            ),
        ),
    ]


def _errors_table() -> sql.Composed:
    return sql.SQL("""
        CREATE TABLE IF NOT EXISTS {} (
            table_name text NOT NULL,
            column_name text NOT NULL,
            row_id bigint NOT NULL,
            source_hash text,
            model_id text NOT NULL,
            error_class text NOT NULL,
            message text NOT NULL,
            attempts integer NOT NULL DEFAULT 1,
            first_seen timestamptz NOT NULL DEFAULT now(),
            last_seen timestamptz NOT NULL DEFAULT now(),
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (table_name, column_name, row_id)
        )""").format(sql.Identifier(ERRORS_TABLE))


def _state_table() -> sql.Composed:
    return sql.SQL("""
        CREATE TABLE IF NOT EXISTS {} (
            key text PRIMARY KEY,
            value text NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        )""").format(sql.Identifier(STATE_TABLE))


def state_age_seconds(conn: psycopg.Connection, key: str) -> float | None:
    """Seconds since `key` was last set in the state table; None if never (or no table)."""
    if not relation_exists(conn, STATE_TABLE):
        return None
    row = conn.execute(
        sql.SQL("SELECT extract(epoch FROM now() - updated_at) FROM {} WHERE key = %s").format(
            sql.Identifier(STATE_TABLE)
        ),
        (key,),
    ).fetchone()
    return float(row[0]) if row else None


def set_state(conn: psycopg.Connection, key: str, value: str) -> None:
    """Set `key` (in the caller's transaction; the table must exist)."""
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
            "SET value = excluded.value, updated_at = now()"
        ).format(sql.Identifier(STATE_TABLE)),
        (key, value),
    )


def ensure_schema(
    conn: psycopg.Connection, settings: StoreSettings, dimension: int, model_id: str | None = None
) -> SchemaReport:
    """Create the extension, tables, bookkeeping columns, tracking triggers and indexes that
    are missing.

    Safe to run any number of times and concurrently; commits on success. Raises
    `SchemaError` when an existing embedding column has another dimension than `dimension`
    (changing models is a separate, explicit operation). With `model_id`, each table gets
    the partial index of the rows that need embedding by that model (rebuilt when the
    configured model changes).
    """
    report = SchemaReport()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        for table, statement in [
            *_base_tables(settings),
            (ERRORS_TABLE, _errors_table()),
            (STATE_TABLE, _state_table()),
        ]:
            if not relation_exists(conn, table):
                conn.execute(statement)
                report.created_tables.append(table)
        for spec in settings.tables.values():
            _ensure_embedding_columns(conn, settings, spec, dimension, report)
            language = settings.search.text_language
            ensure_search_columns(conn, spec, language, report)
            if ensure_tracking(conn, spec, language):
                report.created_triggers.append(tracking_function_name(spec))
            gin = sql.SQL("USING gin ({})").format(sql.Identifier(spec.tsv_column))
            if _ensure_index(conn, spec.table, tsv_index_name(spec), gin):
                report.created_indexes.append(tsv_index_name(spec))
            if model_id is not None and ensure_pending_index(conn, spec, model_id):
                report.created_indexes.append(pending_index_name(spec, model_id))
    conn.commit()
    return report


def _ensure_embedding_columns(
    conn: psycopg.Connection,
    settings: StoreSettings,
    spec: TableSpec,
    dimension: int,
    report: SchemaReport,
) -> None:
    existing = _columns(conn, spec.table)
    missing_text = [
        c for c in (spec.id_column, spec.partition_column, *spec.text_columns) if c not in existing
    ]
    if missing_text:
        raise SchemaError(
            f"table {spec.table} lacks column(s) {', '.join(missing_text)} named in the "
            "settings; check EP_*_TABLE / EP_*_TEXT_COLUMNS"
        )
    wanted = [
        (spec.embedding_column, column_type_sql(settings.embedder.vector_type, dimension)),
        (spec.model_column, sql.SQL("text")),
        (spec.hash_column, sql.SQL("text")),
        (spec.embedded_at_column, sql.SQL("timestamptz")),
        (spec.source_hash_column, sql.SQL("text")),
        (spec.pending_since_column, sql.SQL("timestamptz")),
        (
            spec.extraction_column,
            sql.SQL("bigint REFERENCES {} (id)").format(sql.Identifier(settings.extraction_table)),
        ),
    ]
    for column, type_sql in wanted:
        if column not in existing:
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    sql.Identifier(spec.table), sql.Identifier(column), type_sql
                )
            )
            report.added_columns.append(f"{spec.table}.{column}")
    wanted_type = settings.embedder.vector_type
    declared = vector_column_type(conn, spec)
    if declared is None:
        type_name = _columns(conn, spec.table)[spec.embedding_column]
        raise SchemaError(
            f"{spec.table}.{spec.embedding_column} has type {type_name}, expected "
            f"{wanted_type}({dimension})"
        )
    if declared[1] != dimension:
        raise SchemaError(
            f"{spec.table}.{spec.embedding_column} holds {declared[0]}({declared[1]}) but the "
            f"configured model produces {dimension} dimensions; switch models with "
            "`embedding-pipeline model switch` instead of editing the column"
        )
    if declared[0] != wanted_type:
        raise SchemaError(
            f"{spec.table}.{spec.embedding_column} holds {declared[0]}({declared[1]}) but "
            f"EP_VECTOR_TYPE is {wanted_type}; change the storage type with "
            f"`embedding-pipeline model switch --vector-type {wanted_type}` (or set "
            f"EP_VECTOR_TYPE={declared[0]})"
        )
    indexes = [
        (
            f"{spec.table}_{spec.partition_column}_idx",
            sql.SQL("({})").format(sql.Identifier(spec.partition_column)),
        ),
        (
            f"{spec.table}_{spec.extraction_column}_idx",
            sql.SQL("({})").format(sql.Identifier(spec.extraction_column)),
        ),
    ]
    for name, columns in indexes:
        if _ensure_index(conn, spec.table, name, columns):
            report.created_indexes.append(name)
    if ensure_hnsw_index(conn, spec, settings.hnsw):
        report.created_indexes.append(hnsw_index_name(spec))


def _ensure_index(
    conn: psycopg.Connection, table: str, name: str, definition: sql.Composable
) -> bool:
    if relation_exists(conn, name):
        return False
    conn.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} {}").format(
            sql.Identifier(name), sql.Identifier(table), definition
        )
    )
    return True


def index_state(conn: psycopg.Connection, name: str) -> str | None:
    """'valid', 'invalid' (a failed CREATE INDEX CONCURRENTLY left it behind) or None."""
    row = conn.execute(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
        (_qualified(name),),
    ).fetchone()
    if row is None:
        return None
    return "valid" if row[0] else "invalid"


def bulk_load_lock_key(spec: TableSpec) -> int:
    """Advisory lock key a run holds (session-wide) while it loads `spec`'s column without
    its HNSW index; index creation elsewhere waits for that run to build it."""
    return zlib.crc32(f"bulk-load:{spec.table}.{spec.embedding_column}".encode()) & 0x7FFFFFFF


def cosine_opclass(vector_type: str) -> str:
    """The HNSW operator class that serves `ORDER BY embedding <=> q` on a column of the
    type: `vector_cosine_ops` or `halfvec_cosine_ops`."""
    return f"{vector_type}_cosine_ops"


def hnsw_index_definition(
    spec: TableSpec, hnsw: HnswSettings, vector_type: str = "vector"
) -> sql.Composed:
    return sql.SQL("USING hnsw ({} {}) WITH (m = {}, ef_construction = {})").format(
        sql.Identifier(spec.embedding_column),
        sql.SQL(cosine_opclass(vector_type)),
        sql.Literal(hnsw.m),
        sql.Literal(hnsw.ef_construction),
    )


def ensure_hnsw_index(conn: psycopg.Connection, spec: TableSpec, hnsw: HnswSettings) -> bool:
    """Create the cosine HNSW index on the embedding column if missing; True if created.

    Runs inside the caller's transaction, so it only builds what is quick to build: an
    index over fewer than `hnsw.bulk_load_min_rows` vectors (always the case for a new
    column). A larger column without its index (a bulk load that was killed) is left to
    the next embedding run, which builds it concurrently without blocking writers
    (`sync.sync_embeddings`). Does nothing while another session bulk-loads the column.
    """
    state = index_state(conn, hnsw_index_name(spec))
    if state == "valid":
        return False
    locked = conn.execute(
        "SELECT pg_try_advisory_xact_lock_shared(%s)", (bulk_load_lock_key(spec),)
    ).fetchone()
    if not (locked and locked[0]):
        return False
    vectors = conn.execute(
        sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} WHERE {} IS NOT NULL LIMIT %s) v").format(
            sql.Identifier(spec.table), sql.Identifier(spec.embedding_column)
        ),
        (hnsw.bulk_load_min_rows,),
    ).fetchone()
    if vectors and vectors[0] >= hnsw.bulk_load_min_rows:
        return False
    if state == "invalid":
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(hnsw_index_name(spec))))
    definition = hnsw_index_definition(spec, hnsw, _column_kind(conn, spec))
    return _ensure_index(conn, spec.table, hnsw_index_name(spec), definition)


def _column_kind(conn: psycopg.Connection, spec: TableSpec) -> str:
    """The embedding column's storage type, which its index's operator class follows."""
    found = vector_column_type(conn, spec)
    return found[0] if found else "vector"


def hnsw_build_memory_mb(rows: int, dimension: int, hnsw: HnswSettings) -> int:
    """`maintenance_work_mem` (MB) for an HNSW build over `rows` vectors: the graph's size
    (the vector, its neighbour lists on every layer, pgvector's element overhead; about
    2.3 kB a row at 384 dimensions and m = 16, as pgvector's "no longer fits" notice
    confirms), a quarter more for slack, capped by `hnsw.build_memory_mb`."""
    per_row = 4 * dimension + 40 * hnsw.m + 200
    needed = int(rows * per_row * 1.25 / 2**20) + 16
    return max(64, min(needed, hnsw.build_memory_mb))


def _build_session(conn: psycopg.Connection, spec: TableSpec, hnsw: HnswSettings) -> None:
    """Size this session's `maintenance_work_mem` to the graph about to be built (never
    below the server's setting) and set the parallel workers when configured."""
    row = conn.execute(
        sql.SQL("SELECT count({}) FROM {}").format(
            sql.Identifier(spec.embedding_column), sql.Identifier(spec.table)
        )
    ).fetchone()
    rows = int(row[0]) if row else 0
    memory = hnsw_build_memory_mb(rows, vector_column_dimension(conn, spec) or 0, hnsw)
    current = conn.execute(
        "SELECT setting::bigint * 1024 / 1048576 FROM pg_settings "
        "WHERE name = 'maintenance_work_mem'"
    ).fetchone()
    if current is None or memory > int(current[0]):
        conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (f"{memory}MB",))
    if hnsw.build_workers is not None:
        conn.execute(
            "SELECT set_config('max_parallel_maintenance_workers', %s, false)",
            (str(hnsw.build_workers),),
        )


def build_hnsw_index_concurrently(
    conn: psycopg.Connection, spec: TableSpec, hnsw: HnswSettings, name: str | None = None
) -> bool:
    """CREATE INDEX CONCURRENTLY (writers are not blocked), with the memory the graph needs
    and the server's parallel maintenance workers; `conn` must be in autocommit mode. An
    invalid leftover of an earlier attempt is dropped first. True if built."""
    name = name or hnsw_index_name(spec)
    state = index_state(conn, name)
    if state == "valid":
        return False
    if state == "invalid":
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))
    _build_session(conn, spec, hnsw)
    try:
        conn.execute(
            sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} {}").format(
                sql.Identifier(name),
                sql.Identifier(spec.table),
                hnsw_index_definition(spec, hnsw, _column_kind(conn, spec)),
            )
        )
    finally:
        if not (conn.closed or conn.broken):
            conn.execute("RESET maintenance_work_mem")
            conn.execute("RESET max_parallel_maintenance_workers")
    return True


def drop_hnsw_index_concurrently(conn: psycopg.Connection, spec: TableSpec) -> bool:
    """Drop the HNSW index without blocking readers or writers (`conn` in autocommit)."""
    if index_state(conn, hnsw_index_name(spec)) is None:
        return False
    conn.execute(
        sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            sql.Identifier(hnsw_index_name(spec))
        )
    )
    return True


def registered_model(conn: psycopg.Connection, spec: TableSpec) -> str | None:
    """The model `embedding-pipeline model switch` last put into this embedding column, or
    None when no switch ever happened (then any configured model of the column's
    dimension may write)."""
    if not relation_exists(conn, MODEL_REGISTRY_TABLE):
        return None
    row = conn.execute(
        sql.SQL("SELECT model_id FROM {} WHERE table_name = %s AND column_name = %s").format(
            sql.Identifier(MODEL_REGISTRY_TABLE)
        ),
        (spec.table, spec.embedding_column),
    ).fetchone()
    return str(row[0]) if row else None


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
        (_qualified(spec.table), name),
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
    is `db.needs_embedding_expr` with the model as a literal, so it belongs to one model.
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
            (_qualified(spec.table), _PENDING_COMMENT + "%", name),
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


def ensure_search_columns(
    conn: psycopg.Connection, spec: TableSpec, language: str, report: SchemaReport
) -> None:
    """What search needs besides the vectors: the `tsvector` column of the text columns
    (kept by the tracking trigger, so writing a vector never recomputes it) with its GIN
    index, and B-tree indexes on the filter columns."""
    existing = _columns(conn, spec.table)
    for filtered in SEARCH_FILTER_COLUMNS:
        name = f"{spec.table}_{filtered}_idx"
        definition = sql.SQL("({})").format(sql.Identifier(filtered))
        if filtered in existing and _ensure_index(conn, spec.table, name, definition):
            report.created_indexes.append(name)
    known = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_ts_config WHERE cfgname = %s)",
        (language.rpartition(".")[2],),
    ).fetchone()
    if not (known and known[0]):
        raise SchemaError(
            f"EP_SEARCH_TEXT_LANGUAGE {language!r} is not a text search configuration of "  # noqa: S608
            "this database (SELECT cfgname FROM pg_ts_config lists them)"
        )
    table, column = sql.Identifier(spec.table), sql.Identifier(spec.tsv_column)
    generated = conn.execute(
        "SELECT attgenerated <> '' FROM pg_attribute WHERE attrelid = to_regclass(%s) "
        "AND attname = %s AND NOT attisdropped",
        (_qualified(spec.table), spec.tsv_column),
    ).fetchone()
    if generated is not None and generated[0]:
        # an earlier layout computed it on every write; the trigger keeps it now
        conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(table, column))
        generated = None
    if generated is None:
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} tsvector").format(table, column))
        report.added_columns.append(f"{spec.table}.{spec.tsv_column}")


def tsv_index_name(spec: TableSpec) -> str:
    return f"{spec.table}_{spec.tsv_column}_gin_idx"
