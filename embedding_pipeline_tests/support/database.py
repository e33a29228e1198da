"""Databases on the session's server and the small test chat in them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import psycopg
from psycopg import sql

from embedding_pipeline.lib.embedders import LOCAL_DIMENSION, LOCAL_MODEL_ID, LocalEmbedder
from embedding_pipeline.lib.engine.run import sync_embeddings
from embedding_pipeline.lib.sources.extraction_file import load_extraction
from embedding_pipeline.lib.sources.ingest import ingest
from embedding_pipeline.lib.sources.telegram import ChatExport, load_export
from embedding_pipeline.lib.store import db
from embedding_pipeline.lib.store.domain import Window
from embedding_pipeline.lib.store.pgserver import EmbeddedPostgres
from embedding_pipeline.lib.store.schema import ensure_schema
from embedding_pipeline.settings import Settings
from embedding_pipeline_tests.support.paths import DATA


def create_database(server: EmbeddedPostgres, name: str) -> str:
    """(Re)create an empty database `name` on `server`; returns its URL."""
    name = re.sub(r"[^a-z0-9_]", "_", name.lower())[:60]
    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server.url(name)


def ingest_small_chat(settings: Settings) -> Settings:
    """The schema, then the small test chat and its extraction as one extraction."""
    with db.connection(settings.effective_database_url, vector=False) as conn:
        ensure_schema(conn, settings, LOCAL_DIMENSION, LOCAL_MODEL_ID)
    with db.connection(settings.effective_database_url) as conn:
        ingest(
            conn,
            settings,
            load_export(DATA / "small_export.json"),
            load_extraction(DATA / "small_extraction.json"),
        )
    return settings


def small_export_with_text(folder: Path, message_id: int, text: str) -> ChatExport:
    """The small test export with message `message_id`'s text replaced (as a newer export
    of the chat would have it), written to `folder` and loaded."""
    raw = json.loads((DATA / "small_export.json").read_text())
    next(m for m in raw["messages"] if m["id"] == message_id)["text"] = text
    path = folder / f"small_export_{message_id}_edited.json"
    path.write_text(json.dumps(raw))
    return load_export(path)


def embed_small_chat(settings: Settings) -> Settings:
    """`ingest_small_chat`, then every row embedded with the local model."""
    ingest_small_chat(settings)
    with db.connection(settings.effective_database_url) as conn:
        for spec in settings.tables.values():
            sync_embeddings(conn, spec, LocalEmbedder(), Window(), batch_size=16)
    return settings
