"""Idempotent schema creation and upgrade.

`ensure_schema` creates what is missing and never drops or rewrites data: on an existing
application database it only adds the pipeline's bookkeeping columns and indexes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from embedding_pipeline.lib.store.catalog import (
    column_type_sql,
    ensure_index,
    qualified_name,
    relation_exists,
    table_columns,
    vector_column_type,
)
from embedding_pipeline.lib.store.domain import (
    SEARCH_FILTER_COLUMNS,
    StoreSettings,
    TableSpec,
)
from embedding_pipeline.lib.store.hnsw import ensure_hnsw_index, hnsw_index_name
from embedding_pipeline.lib.store.tracking import (
    ensure_pending_index,
    ensure_tracking,
    pending_index_name,
    tracking_function_name,
)

# Advisory lock key held while the schema changes, so concurrent runs do not race.
SCHEMA_LOCK_KEY = 7_318_004_211
#: Which model each embedding column belongs to, written by `model switch`
#: (lib/engine/model_switch.py).
MODEL_REGISTRY_TABLE = "embedding_models"
#: Rows a provider refused to embed, with the reason and when they are tried again
#: (lib/engine/row_errors.py).
ERRORS_TABLE = "embedding_errors"
#: Small facts the pipeline keeps between runs (key, value, when), e.g. a failed bulk load.
STATE_TABLE = "embedding_pipeline_state"


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
            if ensure_index(conn, spec.table, tsv_index_name(spec), gin):
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
    existing = table_columns(conn, spec.table)
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
        type_name = table_columns(conn, spec.table)[spec.embedding_column]
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
        if ensure_index(conn, spec.table, name, columns):
            report.created_indexes.append(name)
    if ensure_hnsw_index(conn, spec, settings.hnsw):
        report.created_indexes.append(hnsw_index_name(spec))


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


def ensure_search_columns(
    conn: psycopg.Connection, spec: TableSpec, language: str, report: SchemaReport
) -> None:
    """What search needs besides the vectors: the `tsvector` column of the text columns
    (kept by the tracking trigger, so writing a vector never recomputes it) with its GIN
    index, and B-tree indexes on the filter columns."""
    existing = table_columns(conn, spec.table)
    for filtered in SEARCH_FILTER_COLUMNS:
        name = f"{spec.table}_{filtered}_idx"
        definition = sql.SQL("({})").format(sql.Identifier(filtered))
        if filtered in existing and ensure_index(conn, spec.table, name, definition):
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
        (qualified_name(spec.table), spec.tsv_column),
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
