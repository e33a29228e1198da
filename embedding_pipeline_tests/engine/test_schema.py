"""Schema creation is idempotent, upgrades an existing database without losing rows, and
refuses a column of another dimension."""

import psycopg
import pytest
from psycopg import sql

from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.catalog import vector_column_dimension
from embedding_pipeline.lib.store.schema import SchemaError, ensure_schema
from embedding_pipeline.settings import HnswSettings, Settings, TableSpec, default_tables

EXPECTED_COLUMNS = {
    "embedding",
    "embedding_model",
    "embedding_hash",
    "embedded_at",
    "extraction_id",
}


def _columns(conn: psycopg.Connection, table: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT column_name, udt_name FROM information_schema.columns WHERE table_name = %s",
        (table,),
    ).fetchall()
    return dict(rows)


def _hnsw_indexes(conn: psycopg.Connection) -> dict[str, str]:
    rows = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE indexdef ILIKE '%USING hnsw%'"
    ).fetchall()
    return dict(rows)


def test_creates_tables_columns_and_hnsw_indexes(fresh_database_url):
    settings = Settings(database_url=fresh_database_url)
    with db.connection(fresh_database_url, vector=False) as conn:
        report = ensure_schema(conn, settings, 384)
        assert set(report.created_tables) == {
            "extractions",
            "messages",
            "topics",
            "atoms",
            "atoms_messages",
            "embedding_errors",
            "embedding_pipeline_state",
        }
        for table in ("messages", "topics", "atoms"):
            assert set(_columns(conn, table)) >= EXPECTED_COLUMNS
            spec = settings.tables[table]
            assert vector_column_dimension(conn, spec) == 384
        indexes = _hnsw_indexes(conn)
        assert set(indexes) == {
            "messages_embedding_hnsw_idx",
            "topics_embedding_hnsw_idx",
            "atoms_embedding_hnsw_idx",
        }
        for definition in indexes.values():
            assert "vector_cosine_ops" in definition
            assert "m='16'" in definition and "ef_construction='64'" in definition

        again = ensure_schema(conn, settings, 384)
        assert not again.changed


def test_index_parameters_are_settings(fresh_database_url):
    settings = Settings(database_url=fresh_database_url, hnsw=HnswSettings(m=8, ef_construction=32))
    with db.connection(fresh_database_url, vector=False) as conn:
        ensure_schema(conn, settings, 384)
        definition = _hnsw_indexes(conn)["messages_embedding_hnsw_idx"]
    assert "m='8'" in definition and "ef_construction='32'" in definition


def test_upgrades_a_legacy_database_without_losing_rows(fresh_database_url):
    """A database shaped like the replaced system's: embedding columns, no bookkeeping."""
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("""
            CREATE TABLE topics (id bigserial PRIMARY KEY, key text UNIQUE NOT NULL,
                                 name text NOT NULL, description text,
                                 created_at timestamptz NOT NULL DEFAULT now(),
                                 updated_at timestamptz NOT NULL DEFAULT now());
            CREATE TABLE messages (id bigserial PRIMARY KEY, chat_id bigint NOT NULL,
                telegram_message_id bigint NOT NULL, author text, author_id text,
                sent_at timestamptz NOT NULL, edited_at timestamptz,
                reply_to_message_id bigint, content text NOT NULL,
                topic_id bigint REFERENCES topics(id),
                created_at timestamptz NOT NULL DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now(),
                embedding vector(384), UNIQUE (chat_id, telegram_message_id));
            INSERT INTO messages (chat_id, telegram_message_id, sent_at, content)
            SELECT 1, g, now(), 'legacy message ' || g FROM generate_series(1, 237) g;
        """)
    settings = Settings(database_url=fresh_database_url)
    with db.connection(fresh_database_url, vector=False) as conn:
        report = ensure_schema(conn, settings, 384)
        assert "messages.embedding_hash" in report.added_columns
        assert "messages.embedding" not in report.added_columns
        assert "messages" not in report.created_tables
        assert "atoms" in report.created_tables
        count, nulls = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE embedding IS NULL) FROM messages"
        ).fetchone()
        assert (count, nulls) == (237, 237)
        assert "messages_embedding_hnsw_idx" in _hnsw_indexes(conn)


def test_refuses_a_column_of_another_dimension_and_changes_nothing(fresh_database_url):
    settings = Settings(database_url=fresh_database_url)
    with db.connection(fresh_database_url, vector=False) as conn:
        ensure_schema(conn, settings, 384)
        conn.execute("INSERT INTO topics (key, name) VALUES ('k', 'name')")
        conn.commit()
        with pytest.raises(SchemaError, match=r"vector\(384\).*768 dimensions"):
            ensure_schema(conn, settings, 768)
        conn.rollback()
        assert vector_column_dimension(conn, settings.tables["topics"]) == 384
        assert conn.execute("SELECT count(*) FROM topics").fetchone() == (1,)


def test_configured_names_point_at_an_existing_application_table(fresh_database_url):
    tables = default_tables()
    tables["messages"] = TableSpec(
        entity="message",
        table="chat_messages",
        id_column="msg_id",
        text_columns=("body",),
        partition_column="posted_at",
        embedding_column="vec",
    )
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute(
            "CREATE TABLE chat_messages (msg_id bigserial PRIMARY KEY, body text, "
            "posted_at timestamptz)"
        )
        conn.execute("INSERT INTO chat_messages (body, posted_at) VALUES ('hello', now())")
    settings = Settings(database_url=fresh_database_url, tables=tables)
    with db.connection(fresh_database_url, vector=False) as conn:
        report = ensure_schema(conn, settings, 384)
        assert "chat_messages.vec" in report.added_columns
        assert "chat_messages_vec_hnsw_idx" in _hnsw_indexes(conn)
        assert conn.execute(
            sql.SQL("SELECT body FROM {}").format(sql.Identifier("chat_messages"))
        ).fetchone() == ("hello",)


def test_missing_configured_column_is_a_clear_error(fresh_database_url):
    tables = default_tables()
    tables["topics"] = TableSpec(
        entity="topic", table="topics", text_columns=("title",), partition_column="created_at"
    )
    settings = Settings(database_url=fresh_database_url, tables=tables)
    with (
        db.connection(fresh_database_url, vector=False) as conn,
        pytest.raises(SchemaError, match="topics lacks column"),
    ):
        ensure_schema(conn, settings, 384)
